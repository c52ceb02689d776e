"""What a user feels in VS Code: keystroke -> ghost text, in the real editor (code-server in
headless Chromium) with the extension and the embedded model, beside the server's own latency for
the very same requests.

    python -m tests.editors.vscode_e2e.bench [--keystrokes 20]     # `make bench-vscode`

For each hole of engine/eval/demo_holes.py (everyday Python files, one file per hole with the others
filled), the cursor is put at the hole, any suggestion dismissed, and the hole's first character
typed. The page notes the key press and the first ghost text after it (page_probe.js); a stdio tap
between the extension and `maskfill-lsp` (lsp_tap.py) notes when each inline completion request
reached the server and when its answer left. The request counted is the last one answered with
items before the ghost text appeared; editor + extension = keystroke -> ghost text - that.
Debounce is the server's default (adaptive, 75-400 ms): it is part of what the user waits for.

VS Code's default `editor.quickSuggestions` ("offWhenInlineCompletions") waits up to 750 ms for
an inline suggestion before it opens its suggest widget; when the wait runs out it cancels the
inline request and asks again with the widget's selection, so the user waits for two requests.
The table splits the keystrokes that way; `--quick-suggestions off` measures without the widget.

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from engine.eval.demo_holes import DemoHole, demo_holes
from tests.editors.vscode_e2e import lsp_tap
from tests.editors.vscode_e2e.code_server import CodeServer
from tests.editors.vscode_e2e.harness import VENV_SERVER, VSCode, launch_chromium
from tests.editors.vscode_e2e.toolchain import CODE_SERVER_VERSION, find, package_extension
from tests.editors.vscode_e2e.workbench import Workbench, WorkbenchTimeout

GHOST_TIMEOUT_S = 15.0  # a keystroke with no ghost text by then counts as "none shown"
READY_TIMEOUT_S = 300.0  # the embedded model loads on a shared CPU
QUIET_S = 1.0  # after dismissing, before the next keystroke


@dataclass(frozen=True)
class Served:
    server_ms: float | None  # the server's time for the request whose answer was shown
    requests: int  # inline completion requests the keystroke caused
    cancelled: int  # of those, cancelled by the editor
    selection: bool  # the one shown was asked with the suggest widget's item selected


@dataclass(frozen=True)
class Sample:
    task: str
    keystroke_ms: float | None  # None: no ghost text within GHOST_TIMEOUT_S
    served: Served


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def typed_holes(count: int) -> list[DemoHole]:
    """Holes whose text starts with a visible character: the one typed."""
    holes = [h for h in demo_holes() if h.reference[:1].strip() and h.reference[:1] != "\n"]
    return holes[:count]


def tap_script(folder: Path, log: Path) -> Path:
    """An executable the extension runs as its server: the tap, then the real maskfill-lsp."""
    script = folder / "maskfill-lsp-tapped"
    tap = f'"{sys.executable}" "{lsp_tap.__file__}" "{log}"'
    script.write_text(f'#!/bin/sh\nexec {tap} -- "{VENV_SERVER}" "$@"\n', encoding="utf-8")
    script.chmod(0o755)
    return script


def read_tap(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line]


def served(records: list[dict], key_at: float, ghost_at: float | None) -> Served:
    """What the server did for one keystroke: the requests that arrived after the key press,
    and the last one answered with items before the ghost text appeared."""
    inline = [r for r in records if r["dir"] == "in" and r.get("method") == lsp_tap.INLINE]
    asked = {r["id"]: r for r in inline if r["t"] >= key_at}
    cancelled = sum(
        1 for r in records if r["dir"] == "in" and r.get("method") == "cancel" and r["id"] in asked
    )
    answers = [
        r
        for r in records
        if r["dir"] == "out"
        and r["id"] in asked
        and r["items"] > 0
        and ghost_at is not None
        and r["t"] <= ghost_at + 1  # the page's and the tap's clocks: the same, in ms
    ]
    if not answers:
        return Served(None, len(asked), cancelled, False)
    last = max(answers, key=lambda r: r["t"])
    request = asked[last["id"]]
    return Served(last["t"] - request["t"], len(asked), cancelled, request.get("selection", False))


def measure(bench: Workbench, hole: DemoHole, name: str, tap_log: Path) -> Sample:
    bench.quick_open(name)
    line = hole.prompt.count("\n") + 1
    column = len(hole.prompt.rsplit("\n", 1)[-1]) + 1
    bench.go_to(line, column)
    bench.press("Escape")
    bench.wait(lambda: bench.ghost() == "", "no ghost text before the keystroke", 10)
    time.sleep(QUIET_S)
    bench.page.evaluate("window.__maskfillProbe.arm()")
    bench.type(hole.reference[0])
    try:
        bench.wait(
            lambda: bench.page.evaluate("window.__maskfillProbe.ghostAt"),
            "ghost text",
            GHOST_TIMEOUT_S,
        )
    except WorkbenchTimeout:
        pass
    probe = bench.page.evaluate("({k: __maskfillProbe.keyAt, g: __maskfillProbe.ghostAt})")
    time.sleep(0.3)  # the tap's last lines
    keystroke_ms = probe["g"] - probe["k"] if probe["g"] is not None else None
    bench.press("Escape")
    return Sample(hole.task_id, keystroke_ms, served(read_tap(tap_log), probe["k"], probe["g"]))


def run(keystrokes: int, settings: dict, say, keep: Path | None) -> tuple[list[Sample], str]:
    from playwright.sync_api import sync_playwright

    toolchain = find()
    holes = typed_holes(keystrokes + 1)  # the first one warms up and is not counted
    with tempfile.TemporaryDirectory(prefix="maskfill-bench-vscode-") as tmp:
        root = Path(tmp)
        vsix = package_extension(root / "maskfill.vsix")
        tap_log = root / "tap.jsonl"
        server = CodeServer(toolchain, root / "code-server")
        server.set_remote_settings({"maskfill.serverPath": str(tap_script(root, tap_log))})
        server.set_user_settings(settings)  # maskfill's defaults: the embedded model on the CPU
        names = []
        for number, hole in enumerate(holes):
            names.append(f"hole_{number:02d}.py")
            (server.workspace / names[-1]).write_text(hole.prompt + hole.suffix, encoding="utf-8")
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright, toolchain)
            vs = VSCode(server, vsix, browser)
            try:
                bench = vs.launch()
                bench.quick_open(names[0])
                bench.wait_status(r"maskfill: ready", READY_TIMEOUT_S)
                samples = []
                for number, (hole, name) in enumerate(zip(holes, names, strict=True)):
                    sample = measure(bench, hole, name, tap_log)
                    if number > 0:
                        samples.append(sample)
                    say(f"  {sample.task}: {sample}")
                return samples, toolchain.vscode_version()
            finally:
                vs.close()
                browser.close()
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(tap_log, keep / "tap.jsonl")
                    (keep / "diagnostics.txt").write_text(server.diagnostics(tail=200_000))


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def stats(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return round(statistics.median(values), 1), round(percentile(values, 0.95), 1)


def report(samples: list[Sample], vscode_version: str, settings: dict) -> dict:
    shown = [s for s in samples if s.keystroke_ms is not None]
    paired = [s for s in shown if s.served.server_ms is not None]
    rows = [
        ("keystroke -> ghost text (VS Code)", [s.keystroke_ms for s in shown]),
        ("server, the request shown (tap)", [s.served.server_ms for s in paired]),
        ("editor + extension (difference)", [s.keystroke_ms - s.served.server_ms for s in paired]),
    ]
    # VS Code's default quickSuggestions ("offWhenInlineCompletions") waits 750 ms for inline
    # completions; when that runs out it cancels the request, opens the suggest widget and asks
    # again with the widget's selection: the user waits for two requests.
    alone = [s for s in paired if s.served.requests == 1]
    rows.append(("  answered at the first request", [s.keystroke_ms for s in alone]))
    rows.append(("    editor + extension", [s.keystroke_ms - s.served.server_ms for s in alone]))
    more = [s for s in paired if s.served.requests > 1]
    rows.append(("  asked again (750 ms ran out)", [s.keystroke_ms for s in more]))
    rows.append(
        (
            "    editor + extension + 1st request",
            [s.keystroke_ms - s.served.server_ms for s in more],
        )
    )
    table = [(title, len(values), *stats(values)) for title, values in rows]

    changed = ", ".join(f"{k} {v}" for k, v in settings.items()) or "VS Code's defaults"
    print(
        f"\nVS Code {vscode_version} (code-server {CODE_SERVER_VERSION}, headless Chromium), "
        f"embedded model on the CPU, maskfill's defaults; editor: {changed}"
    )
    requests = [s.served.requests for s in samples]
    print(
        f"keystrokes {len(samples)}, ghost text after {len(shown)}; requests per keystroke "
        f"{statistics.mean(requests):.2f} (cancelled by the editor "
        f"{statistics.mean(s.served.cancelled for s in samples):.2f}); the one shown carried the "
        f"suggest widget's selection for {sum(s.served.selection for s in paired)}"
    )
    print(f"{'':36} {'n':>4} {'p50 ms':>8} {'p95 ms':>8}")
    for title, n, p50, p95 in table:
        print(f"{title:36} {n:>4} {cell(p50):>8} {cell(p95):>8}")
    result = {
        "vscode_version": vscode_version,
        "editor_settings": settings,
        "vscode_keystrokes": len(samples),
        "vscode_ghost_shown": len(shown),
        "vscode_requests_per_keystroke": round(statistics.mean(requests), 2),
        "vscode_keystroke_to_ghost_ms_p50": table[0][2],
        "vscode_keystroke_to_ghost_ms_p95": table[0][3],
        "vscode_server_ms_p50": table[1][2],
        "vscode_server_ms_p95": table[1][3],
        "vscode_editor_share_ms_p50": table[2][2],
        "vscode_editor_share_ms_p95": table[2][3],
    }
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.editors.vscode_e2e.bench")
    parser.add_argument("--keystrokes", type=int, default=20, help="measured keystrokes (<= 21)")
    parser.add_argument(
        "--quick-suggestions",
        choices=["default", "off"],
        default="default",
        help="off: no word suggestions popping up while typing (editor.quickSuggestions)",
    )
    parser.add_argument("--keep", type=Path, help="copy the tap's records and the logs here")
    parser.add_argument("--quiet", action="store_true", help="no line per keystroke")
    args = parser.parse_args(argv)
    settings = {"editor.quickSuggestions": {"other": "off", "comments": "off", "strings": "off"}}
    settings = settings if args.quick_suggestions == "off" else {}
    say = (lambda _: None) if args.quiet else print
    samples, vscode_version = run(args.keystrokes, settings, say, args.keep)
    report(samples, vscode_version, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a user feels in VS Code: keystroke -> ghost text, in the real editor (code-server in
headless Chromium) with the extension and the embedded model, beside the server's own latency for
the very same requests.

    python -m tests.editors.vscode_e2e.bench [--keystrokes 20]     # `make bench-vscode`

For each hole of engine/demo_holes.py (everyday Python files, one file per hole with the others
filled), the cursor is put at the hole, any suggestion dismissed, and the hole's first character
typed. The page notes the key press and the first ghost text after it (page_probe.js); a stdio tap
between the extension and `maskfill-lsp` (lsp_tap.py) notes when each inline completion request
reached the server and when its answer left. The request counted is the last one answered with
items before the ghost text appeared; editor + extension = keystroke -> ghost text - that.
Debounce is the server's default (adaptive, 75-400 ms): it is part of what the user waits for.

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from engine.demo_holes import DemoHole, demo_holes
from tests.editors.vscode_e2e import lsp_tap
from tests.editors.vscode_e2e.code_server import CodeServer
from tests.editors.vscode_e2e.harness import VENV_SERVER, VSCode, launch_chromium
from tests.editors.vscode_e2e.toolchain import CODE_SERVER_VERSION, find, package_extension
from tests.editors.vscode_e2e.workbench import Workbench, WorkbenchTimeout

GHOST_TIMEOUT_S = 15.0  # a keystroke with no ghost text by then counts as "none shown"
READY_TIMEOUT_S = 300.0  # the embedded model loads on a shared CPU
QUIET_S = 1.0  # after dismissing, before the next keystroke


@dataclass(frozen=True)
class Sample:
    task: str
    keystroke_ms: float | None  # None: no ghost text within GHOST_TIMEOUT_S
    server_ms: float | None  # the server's time for the request whose answer was shown
    requests: int  # inline completion requests the keystroke caused


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


def served(records: list[dict], key_at: float, ghost_at: float | None) -> tuple[float | None, int]:
    """(server ms of the request answered last with items before the ghost, requests since the
    key press)."""
    arrived = {r["id"]: r["t"] for r in records if r["dir"] == "in" and r.get("method") != "cancel"}
    asked = [rid for rid, t in arrived.items() if t >= key_at]
    if ghost_at is None:
        return None, len(asked)
    answers = [
        r
        for r in records
        if r["dir"] == "out" and r["id"] in asked and r["items"] > 0 and r["t"] <= ghost_at + 1
    ]
    if not answers:
        return None, len(asked)
    last = max(answers, key=lambda r: r["t"])
    return last["t"] - arrived[last["id"]], len(asked)


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
    server_ms, requests = served(read_tap(tap_log), probe["k"], probe["g"])
    keystroke_ms = probe["g"] - probe["k"] if probe["g"] is not None else None
    bench.press("Escape")
    return Sample(hole.task_id, keystroke_ms, server_ms, requests)


def run(keystrokes: int, say) -> tuple[list[Sample], str]:
    from playwright.sync_api import sync_playwright

    toolchain = find()
    holes = typed_holes(keystrokes + 1)  # the first one warms up and is not counted
    with tempfile.TemporaryDirectory(prefix="maskfill-bench-vscode-") as tmp:
        root = Path(tmp)
        vsix = package_extension(root / "maskfill.vsix")
        tap_log = root / "tap.jsonl"
        server = CodeServer(toolchain, root / "code-server")
        server.set_remote_settings({"maskfill.serverPath": str(tap_script(root, tap_log))})
        server.set_user_settings({})  # the defaults: the embedded model on the CPU
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


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def report(samples: list[Sample], vscode_version: str) -> dict:
    shown = [s for s in samples if s.keystroke_ms is not None]
    paired = [s for s in shown if s.server_ms is not None]
    feel = [s.keystroke_ms for s in shown]
    server = [s.server_ms for s in paired]
    editor = [s.keystroke_ms - s.server_ms for s in paired]

    def stats(values: list[float]) -> tuple[float | None, float | None]:
        if not values:
            return None, None
        return round(statistics.median(values), 1), round(percentile(values, 0.95), 1)

    rows = [
        ("keystroke -> ghost text (VS Code)", stats(feel)),
        ("server, same requests (tap)", stats(server)),
        ("editor + extension (difference)", stats(editor)),
    ]
    print(
        f"\nVS Code {vscode_version} (code-server {CODE_SERVER_VERSION}, headless Chromium), "
        "embedded model, CPU, server defaults"
    )
    print(
        f"keystrokes: {len(samples)}; ghost text shown after {len(shown)}; "
        f"server time matched for {len(paired)}; "
        f"requests per keystroke: {statistics.mean(s.requests for s in samples):.2f}"
    )
    print(f"{'':36} {'p50 ms':>9} {'p95 ms':>9}")
    for title, (p50, p95) in rows:
        print(f"{title:36} {cell(p50):>9} {cell(p95):>9}")
    result = {
        "vscode_version": vscode_version,
        "vscode_keystrokes": len(samples),
        "vscode_ghost_shown": len(shown),
        "vscode_keystroke_to_ghost_ms_p50": rows[0][1][0],
        "vscode_keystroke_to_ghost_ms_p95": rows[0][1][1],
        "vscode_server_ms_p50": rows[1][1][0],
        "vscode_server_ms_p95": rows[1][1][1],
        "vscode_editor_share_ms_p50": rows[2][1][0],
        "vscode_editor_share_ms_p95": rows[2][1][1],
    }
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.editors.vscode_e2e.bench")
    parser.add_argument("--keystrokes", type=int, default=20, help="measured keystrokes")
    parser.add_argument("--quiet", action="store_true", help="no line per keystroke")
    args = parser.parse_args(argv)
    samples, vscode_version = run(args.keystrokes, (lambda _: None) if args.quiet else print)
    report(samples, vscode_version)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make run`: complete the sample file through the real server, as an editor would.

Starts `maskfill-lsp` over stdio, opens lsp_server/sample/sample.py (its `<CURSOR>` marker is
removed and becomes the cursor) and waits for the model to load. Then it asks twice, as an editor
does: an automatic request (what appears as you type: one greedy suggestion) and a manual one (the
manual trigger: several candidates). The output is the same on every run, however busy the machine:
the first suggestion is greedy, the extra candidates are sampled with a seed taken from the
context, and the demo lifts the per-request deadline (an editor's `timeoutMs` cuts a slow run at
whatever the model had committed by then, which depends on the machine's load). Timings follow,
with what the engine ran. Exits non-zero with one clear line when anything fails.

    python -m lsp_server.tools.demo [--model PATH] [--device cpu] [--file F] [-v]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsprotocol import types

from engine.model.embedded_model import EMBEDDED_DIR
from engine.stop import stop_for_cursor
from lsp_server.client import ClientError, Session, inline_params, server_command
from lsp_server.settings import Settings

SAMPLE = Path(__file__).resolve().parents[1] / "sample" / "sample.py"
MARKER = "<CURSOR>"
# No debounce: the round trips below are the model and the protocol, not a wait for typing.
# No deadline that load can reach: a run cut at `timeoutMs` returns what the model had committed
# by then, so under load the text changed from run to run (issue 21.5).
DEMO_TIMEOUT_MS = 600_000
DEMO_SETTINGS = {"debounceMinMs": 0, "debounceMaxMs": 0, "timeoutMs": DEMO_TIMEOUT_MS}
CONTEXT_LINES = 3  # shown above and below the cursor
WIDTH = 100


def cursor_position(text: str) -> tuple[str, types.Position]:
    """Strip the marker; the position is in UTF-16 units, the encoding this client declares."""
    if MARKER not in text:
        raise ClientError(f"the sample file has no {MARKER} marker")
    before, after = text.split(MARKER, 1)
    column = before[before.rfind("\n") + 1 :]
    return before + after, types.Position(
        line=before.count("\n"), character=len(column.encode("utf-16-le")) // 2
    )


@dataclass
class Answer:
    """One inline request's suggestions and what the server did for it."""

    texts: list[str]
    round_trip_ms: float
    engine_ms: float | None  # None: answered without a model run
    passes_per_token: float | None = None


async def ask(session: Session, uri: str, position: types.Position, *, invoked: bool) -> Answer:
    before = await session.status()
    started = time.perf_counter()
    answer = await session.client.text_document_inline_completion_async(
        inline_params(uri, position, invoked=invoked)
    )
    round_trip_ms = (time.perf_counter() - started) * 1000
    after = await session.status()
    items = answer.items if isinstance(answer, types.InlineCompletionList) else []
    ran = after["modelRuns"] > before["modelRuns"] and after["recentEngineMs"]
    texts = [i.insert_text if isinstance(i.insert_text, str) else i.insert_text.value
             for i in items]
    return Answer(texts, round_trip_ms, after["recentEngineMs"][-1] if ran else None)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    path = Path(args.file)
    text, position = cursor_position(path.read_text(encoding="utf-8"))
    session, result = await Session.start(
        server_command(args.model, args.device), settings=DEMO_SETTINGS, verbose=args.verbose
    )
    try:
        initialize_ms = (time.perf_counter() - session.started) * 1000
        if result.capabilities.inline_completion_provider is None:
            raise ClientError("the server does not advertise textDocument/inlineCompletion")
        await session.wait_loaded()
        # Two documents with the same text: the manual request must run the model itself, not
        # reuse the automatic answer remembered for the first one.
        uri = path.resolve().as_uri()
        session.open(uri, text)
        automatic = await ask(session, uri, position, invoked=False)
        # forwardPassesPerToken accumulates over runs: read it while this is the only one.
        automatic.passes_per_token = (await session.status())["forwardPassesPerToken"]
        session.open("untitled:manual-trigger.py", text)
        manual = await ask(session, "untitled:manual-trigger.py", position, invoked=True)
        status = await session.status()
    finally:
        await session.close()
    lines = text.split("\n")
    line = lines[position.line]
    cursor = len(line.encode("utf-16-le")[: position.character * 2].decode("utf-16-le"))
    return {
        "file": path,
        "position": position,
        "lines": lines,
        "cursor": cursor,
        "stop": stop_for_cursor(line[:cursor], line[cursor:]),
        "initialize_ms": initialize_ms,
        "automatic": automatic,
        "manual": manual,
        "status": status,
    }


def span_lengths(stop: str, max_tokens: int) -> list[int]:
    """The hole lengths the engine tries in one batch for this stop mode and span budget."""
    from engine.api import CompletionRequest
    from engine.engine import hole_lengths

    return hole_lengths(CompletionRequest(prefix="", suffix="", max_tokens=max_tokens, stop=stop))


def say(text: str, indent: str = "") -> None:
    print(textwrap.fill(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  "))


def print_text(text: str, label: str = "") -> None:
    for index, line in enumerate(text.splitlines() or [""]):
        print(f"  {label if index == 0 else ' ' * len(label)}| {line}")


def print_context(lines: list[str], line: int, cursor: int) -> None:
    """The lines around the cursor, numbered as editors number them, with a caret under it."""
    first, last = max(0, line - CONTEXT_LINES), min(len(lines), line + CONTEXT_LINES + 1)
    width = len(str(last))
    for index in range(first, last):
        print(f"  {index + 1:>{width}} | {lines[index]}".rstrip())
        if index == line:
            caret = " " * len(lines[index][:cursor].expandtabs())
            print(f"  {'':>{width}} | {caret}^ cursor")


def first_candidate(automatic: Answer, manual: Answer) -> str:
    """What the manual trigger's first candidate is, as this run shows it."""
    if not manual.texts:
        return ""
    if automatic.texts and manual.texts[0] == automatic.texts[0]:
        return "the first is the greedy one, the suggestion shown as you type; "
    # Both are the best greedy row (same context, same hole lengths); a bigger batch and the
    # context reused from the first request change the rounding, which can tip a close call.
    return ("the first is the best greedy row of this bigger batch (it differs from the "
            "suggestion shown as you type: rounding in a bigger pass tipped a close call); ")


def report(outcome: dict[str, Any]) -> None:
    status, position, stop = outcome["status"], outcome["position"], outcome["stop"]
    automatic, manual = outcome["automatic"], outcome["manual"]
    print(
        f"model:    {status['model']} ({status['family']}, {status['device']}, "
        f"{status['dtype']}, quant {status['quant']})"
    )
    if Path(status["model"] or "").resolve() == EMBEDDED_DIR:
        say("the embedded demo model: it shows the pipeline working, not useful code", " " * 10)
    say(
        f"cursor:   {outcome['file'].name}, line {position.line + 1}, column "
        f"{position.character + 1} (stop mode {stop}, as the editors' default `auto` picks it)"
    )
    print()
    print_context(outcome["lines"], position.line, outcome["cursor"])
    print()
    print("Shown as you type (an automatic request: one suggestion, greedy):")
    if automatic.texts:
        print_text(automatic.texts[0])
    else:
        print("  (the model had no suggestion for this cursor)")
    print()
    from engine.engine import EXTRA_CANDIDATE_TEMPERATURE

    say(
        "On the manual trigger (Alt+\\ in VS Code, <C-Space> in Neovim): up to "
        f"{Settings().num_candidates} candidates to cycle (duplicates collapse); "
        f"{first_candidate(automatic, manual)}the others are sampled (temperature "
        f"{EXTRA_CANDIDATE_TEMPERATURE}) with a seed taken from the code around the cursor, so "
        "they too are the same on every run:"
    )
    for index, text in enumerate(manual.texts, 1):
        print_text(text, f"{index} ")
    if not manual.texts:
        print("  (no candidates)")
    print()
    timings(outcome)


def timings(outcome: dict[str, Any]) -> None:
    status, stop = outcome["status"], outcome["stop"]
    settings = Settings()
    lengths = span_lengths(stop, settings.max_tokens)
    line_lengths = span_lengths("line", settings.max_tokens)
    spans = "/".join(map(str, lengths))
    say(
        f"Timings: start {outcome['initialize_ms']:.0f} ms, model load {status['loadMs'] or 0:.0f} "
        f"ms. The engine denoises one batch of rows: candidates x span lengths ({spans} tokens for "
        f"stop mode {stop}, since the length of the middle is unknown), and keeps the best row."
    )
    for name, answer, candidates in (
        ("automatic", outcome["automatic"], 1),
        ("manual", outcome["manual"], settings.num_candidates),
    ):
        rows = f"{candidates} x {len(lengths)} = {candidates * len(lengths)} rows"
        if answer.engine_ms is None:
            say(f"{name + ':':<10} {rows}; answered from a cache, no model run", "  ")
            continue
        overhead = answer.round_trip_ms - answer.engine_ms
        say(
            f"{name + ':':<10} {rows}: engine {answer.engine_ms:.0f} ms, round trip "
            f"{answer.round_trip_ms:.0f} ms (server and protocol {overhead:.1f} ms)",
            "  ",
        )
    passes = outcome["automatic"].passes_per_token
    if passes is not None:
        say(
            f"The automatic run made {passes} forward passes per token of the suggestion it kept: "
            "a pass commits every slot the model is sure enough of (at least one per row), and "
            "the batch runs until its slowest row is decided.",
            "  ",
        )
    say(
        f"One-line holes (text after the cursor) try {'/'.join(map(str, line_lengths))} tokens "
        "and finish sooner. Editors also wait for a pause in typing (debounce), off here, and "
        f"give each request {settings.timeout_ms / 1000:g} s (timeoutMs), then show what the "
        "model committed by then; the demo waits for every run to finish, so its text does not "
        "depend on how busy the machine is.",
        "  ",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--device", help="cpu, cuda, ...")
    parser.add_argument("--file", default=str(SAMPLE), help=f"a file with a {MARKER} marker")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the server's log")
    args = parser.parse_args(argv)
    try:
        outcome = asyncio.run(run(args))
    except ClientError as exc:
        print(f"maskfill demo failed: {exc}", file=sys.stderr)
        return 1
    except (OSError, RuntimeError, asyncio.TimeoutError) as exc:
        print(f"maskfill demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    report(outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())

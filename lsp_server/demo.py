"""`make run`: complete the sample file through the real server, as an editor would.

Starts `maskfill-lsp` over stdio, opens lsp_server/sample/sample.py (its `<CURSOR>` marker is
removed and becomes the cursor), waits for the model to load, asks for an inline completion
and prints it with its timings. Exits non-zero with one clear line when anything fails.

    python -m lsp_server.demo [--model PATH] [--device cpu] [--file F] [-v]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from lsprotocol import types

from lsp_server.client import ClientError, Session, inline_params, server_command

SAMPLE = Path(__file__).parent / "sample" / "sample.py"
MARKER = "<CURSOR>"


def cursor_position(text: str) -> tuple[str, types.Position]:
    """Strip the marker; the position is in UTF-16 units, the encoding this client declares."""
    if MARKER not in text:
        raise ClientError(f"the sample file has no {MARKER} marker")
    before, after = text.split(MARKER, 1)
    column = before[before.rfind("\n") + 1 :]
    return before + after, types.Position(
        line=before.count("\n"), character=len(column.encode("utf-16-le")) // 2
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    text, position = cursor_position(Path(args.file).read_text(encoding="utf-8"))
    session, result = await Session.start(
        server_command(args.model, args.device), verbose=args.verbose
    )
    try:
        initialize_ms = (time.perf_counter() - session.started) * 1000
        if result.capabilities.inline_completion_provider is None:
            raise ClientError("the server does not advertise textDocument/inlineCompletion")
        before = await session.wait_loaded()
        uri = Path(args.file).resolve().as_uri()
        session.open(uri, text)
        request_started = time.perf_counter()
        answer = await session.client.text_document_inline_completion_async(
            inline_params(uri, position, invoked=True)
        )
        round_trip_ms = (time.perf_counter() - request_started) * 1000
        after = await session.status()
    finally:
        await session.close()
    ran = after["modelRuns"] > before["modelRuns"]
    return {
        "items": answer.items if isinstance(answer, types.InlineCompletionList) else [],
        "position": position,
        "initialize_ms": initialize_ms,
        "round_trip_ms": round_trip_ms,
        "engine_ms": after["recentEngineMs"][-1] if ran and after["recentEngineMs"] else None,
        "status": after,
    }


def report(outcome: dict[str, Any]) -> None:
    status, position = outcome["status"], outcome["position"]
    print(
        f"model:      {status['model']} ({status['family']}, {status['device']}, "
        f"{status['dtype']}, quant {status['quant']})"
    )
    print(f"cursor:     line {position.line + 1}, column {position.character + 1}")
    if not outcome["items"]:
        print("completion: (the model had no suggestion for this cursor)")
    for index, item in enumerate(outcome["items"], 1):
        print(f"completion {index}:")
        for line in item.insert_text.splitlines() or [""]:
            print(f"  | {line}")
    engine_ms, round_trip_ms = outcome["engine_ms"], outcome["round_trip_ms"]
    engine = f"{engine_ms:.0f} ms" if engine_ms is not None else "n/a"
    overhead = f"{round_trip_ms - engine_ms:.1f} ms" if engine_ms is not None else "n/a"
    print(
        f"timings:    initialize {outcome['initialize_ms']:.0f} ms, model load "
        f"{status['loadMs'] or 0:.0f} ms, LSP round trip {round_trip_ms:.0f} ms, "
        f"engine {engine}, server overhead {overhead}"
    )
    if status["forwardPassesPerToken"] is not None:
        print(f"            {status['forwardPassesPerToken']} forward passes per committed token")


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

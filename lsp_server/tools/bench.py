"""Server benchmark: what the LSP layer adds on top of the engine, and how it absorbs typing.

    python -m lsp_server.tools.bench [--model PATH] [--device cpu] [--requests 30]
                                     [--profile FILE]

--profile: the server runs under cProfile (its event loop's thread; $MASKFILL_PROFILE), the
stats go to FILE and the costliest functions are printed.

1. Overhead: sequential Automatic requests with debounce and caches off, each on a fresh
   context so the model runs every time. The server times each one itself (maskfill.status
   `recentRequests`, lsp_server/request_timing.py): overhead = from the request's body read to
   its response written, minus the engine's time (engine.complete, timed by the worker). Also
   the CPU time the server's event loop thread spent meanwhile, and the CPU time of the work
   done for it on other threads (the hole's syntax check, built while the model runs, and
   the rows' cut, on the engine host's runner after it): CPU time is what load on the
   machine does not inflate. The client's round trip (its own JSON work and the
   pipes included) is printed beside.
2. Rapid typing: 100 didChange + inlineCompletion pairs sent back to back on one document with
   the default settings (like Neovim: nothing cancelled by the client); the model runs counted.

Prints a table, then one JSON line with `server_overhead_ms_p50` and
`model_runs_per_100_rapid_requests`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lsprotocol import types

from lsp_server.client import ClientError, Session, inline_params, server_command
from lsp_server.request_timing import PROFILE_ENV

PROFILE_LINES = 30
NO_WAITING = {"debounceMinMs": 0, "debounceMaxMs": 0, "cacheSize": 0, "timeoutMs": 600000}
DEFAULTS = {"debounceMinMs": 75, "debounceMaxMs": 400, "cacheSize": 256}
# name -> label, in the table's order
TIMED = {
    "overhead": "server overhead (wall)",
    "loop_cpu": "  event loop CPU",
    "offloaded_cpu": "  syntax check + cut CPU",
    "engine": "engine",
    "round_trip": "client round trip",
    "round_trip_overhead": "round trip - engine",
}
BASE = "def add(a, b):\n    return a + b\n\n\ndef is_even(n):\n"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def measure_overhead(session: Session, count: int) -> dict[str, list[float]]:
    uri = "file:///bench/overhead.py"
    timings: dict[str, list[float]] = {key: [] for key in TIMED}
    for i in range(count + 1):  # the first request warms paths up and is not counted
        text = f"# request {i}\n{BASE}"  # a fresh context every time: no cache can answer
        session.client.text_document_did_open(
            types.DidOpenTextDocumentParams(
                text_document=types.TextDocumentItem(
                    uri=uri, language_id="python", version=i + 1, text=text
                )
            )
        )
        before = await session.status()
        started = time.perf_counter()
        await session.client.text_document_inline_completion_async(
            inline_params(uri, types.Position(line=6, character=0), invoked=False)
        )
        elapsed = (time.perf_counter() - started) * 1000
        after = await session.status()
        timed = after["recentRequests"][-1] if after["recentRequests"] else {}
        if after["modelRuns"] != before["modelRuns"] + 1 or timed.get("engineMs") is None:
            raise ClientError(f"request {i} did not run the model exactly once")
        if i == 0:
            continue
        timings["round_trip"].append(elapsed)
        timings["engine"].append(timed["engineMs"])
        timings["overhead"].append(timed["overheadMs"])
        timings["loop_cpu"].append(timed["loopCpuMs"])
        timings["offloaded_cpu"].append(timed["offloadedCpuMs"])
        timings["round_trip_overhead"].append(elapsed - timed["engineMs"])
    return timings


async def rapid_typing(session: Session, count: int = 100) -> dict[str, Any]:
    session.client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(settings=DEFAULTS)
    )
    uri = "file:///bench/rapid.py"
    session.open(uri, BASE)
    before = await session.status()
    futures = []
    typed = ("    return n % 2 == 0  # one key at a time " + "x" * 100)[:count]
    started = time.perf_counter()
    for i, ch in enumerate(typed):
        at = types.Position(line=5, character=i)
        session.client.text_document_did_change(
            types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=i + 2),
                content_changes=[
                    types.TextDocumentContentChangePartial(
                        range=types.Range(start=at, end=at), text=ch
                    )
                ],
            )
        )
        params = inline_params(uri, types.Position(line=5, character=i + 1), invoked=False)
        futures.append(
            asyncio.wrap_future(
                session.client.protocol.send_request(types.TEXT_DOCUMENT_INLINE_COMPLETION, params)
            )
        )
    answers = await asyncio.gather(*futures)
    burst_ms = (time.perf_counter() - started) * 1000
    after = await session.status()
    return {
        "model_runs": after["modelRuns"] - before["modelRuns"],
        "answered_non_empty": sum(1 for a in answers if a is not None and a.items),
        "burst_ms": burst_ms,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    session, _ = await Session.start(
        server_command(args.model, args.device), settings=NO_WAITING, verbose=args.verbose
    )
    try:
        status = await session.wait_loaded()
        timings = await measure_overhead(session, args.requests)
        rapid = await rapid_typing(session)
    finally:
        await session.close()
    return {"status": status, "timings": timings, "rapid": rapid}


def report(outcome: dict[str, Any], requests: int) -> dict[str, Any]:
    timings, rapid, status = outcome["timings"], outcome["rapid"], outcome["status"]
    print(f"model {status['model']} on {status['device']} ({status['dtype']})")
    print(f"{'':<28}{'p50 ms':>10}{'p95 ms':>10}")
    for name, label in TIMED.items():
        values = timings[name]
        print(f"{label:<28}{statistics.median(values):>10.2f}{percentile(values, 0.95):>10.2f}")
    print(
        f"100 rapid edits+requests: {rapid['model_runs']} model runs, "
        f"{rapid['answered_non_empty']} non-empty answers, {rapid['burst_ms']:.0f} ms in all"
    )
    return {
        "server_overhead_ms_p50": round(statistics.median(timings["overhead"]), 3),
        "server_overhead_ms_p95": round(percentile(timings["overhead"], 0.95), 3),
        "server_loop_cpu_ms_p50": round(statistics.median(timings["loop_cpu"]), 3),
        "server_loop_cpu_ms_p95": round(percentile(timings["loop_cpu"], 0.95), 3),
        "server_offloaded_cpu_ms_p50": round(statistics.median(timings["offloaded_cpu"]), 3),
        "round_trip_ms_p50": round(statistics.median(timings["round_trip"]), 3),
        "engine_ms_p50": round(statistics.median(timings["engine"]), 3),
        "overhead_requests": requests,
        "model_runs_per_100_rapid_requests": rapid["model_runs"],
        "model": status["model"],
        "device": status["device"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--device", help="cpu, cuda, ...")
    parser.add_argument("--requests", type=int, default=30, help="sequential requests timed")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the server's log")
    parser.add_argument("--profile", type=Path, help="cProfile the server's event loop into FILE")
    args = parser.parse_args(argv)
    if args.profile is not None:
        os.environ[PROFILE_ENV] = str(args.profile.resolve())
    try:
        outcome = asyncio.run(run(args))
    except (ClientError, OSError, RuntimeError, asyncio.TimeoutError) as exc:
        print(f"maskfill server bench failed: {exc}", file=sys.stderr)
        return 1
    figures = report(outcome, args.requests)
    if args.profile is not None:
        try:
            pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(PROFILE_LINES)
        except OSError as exc:  # the server died before writing it: the figures still print
            print(f"no server profile: {exc}", file=sys.stderr)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

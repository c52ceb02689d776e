"""Three editor windows on one shared engine, against one window with its own model.

    python -m lsp_server.tools.shared_bench [--model PATH] [--device cpu] [--requests 20]

Baseline: one `maskfill-lsp` with the model in process, sequential Automatic requests on fresh
contexts (debounce and caches off, so the model runs every time). Then three `maskfill-lsp`
processes in shared mode, in a private runtime folder: the same requests taking turns between
the windows (one person typing in one window at a time), then all three at once. Counts the
models resident (engine processes x their loads, plus any in-process model) and their bytes.
Prints a table, then one JSON line (`resident_models_three_clients`, `three_client_p50_ratio`,
...). Used by engine/bench/shared_engine.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lsprotocol import types

from engine.api import EngineError
from engine.serve.client import EngineConnection
from engine.serve.paths import RUNTIME_DIR_ENV
from lsp_server.client import ClientError, Session, inline_params, server_command
from lsp_server.tools.bench import BASE, NO_WAITING

WINDOWS = 3


async def timed_request(session: Session, uri: str, i: int) -> float:
    """One Automatic request on a context never seen before: the model must run."""
    session.client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=uri, language_id="python", version=1,
                                             text=f"# request {i} in {uri}\n{BASE}")))
    started = time.perf_counter()
    await session.client.text_document_inline_completion_async(
        inline_params(uri, types.Position(line=6, character=0), invoked=False))
    elapsed = (time.perf_counter() - started) * 1000
    session.client.text_document_did_close(types.DidCloseTextDocumentParams(
        text_document=types.TextDocumentIdentifier(uri=uri)))
    return elapsed


async def start_sessions(command: list[str], settings: dict[str, Any], count: int
                         ) -> list[Session]:
    sessions = []
    for _ in range(count):
        session, _ = await Session.start(command, settings=settings)
        sessions.append(session)
    for session in sessions:
        await session.wait_loaded()
    return sessions


def engines_in(folder: Path) -> list[dict[str, Any]]:
    """Status of every engine answering on a socket in `folder`."""
    found = []
    for sock in sorted(folder.glob("*.sock")):
        with contextlib.suppress(OSError, EngineError):
            connection = EngineConnection.unix(sock, name="bench")
            found.append(connection.status().stats)
            connection.close()
    return found


async def run(model: str | None, device: str | None, requests: int) -> dict[str, Any]:
    command = server_command(model, device)
    single = await start_sessions(command, {**NO_WAITING, "engineMode": "inprocess"}, 1)
    try:
        await timed_request(single[0], "file:///warm.py", -1)
        alone = [await timed_request(single[0], f"file:///a{i}.py", i) for i in range(requests)]
    finally:
        await single[0].close()

    shared_settings = {**NO_WAITING, "engineMode": "shared", "engineIdleExitS": 5}
    windows = await start_sessions(command, shared_settings, WINDOWS)
    try:
        for n, session in enumerate(windows):
            await timed_request(session, f"file:///warm{n}.py", -1)
        turns = [await timed_request(windows[i % WINDOWS], f"file:///t{i}.py", i)
                 for i in range(requests)]
        together: list[float] = []
        for r in range(max(1, requests // WINDOWS)):
            together += await asyncio.gather(*(
                timed_request(s, f"file:///c{r}-{n}.py", 1000 + r) for n, s in
                enumerate(windows)))
        statuses = [await s.status() for s in windows]
        engines = engines_in(Path(os.environ[RUNTIME_DIR_ENV]))
    finally:
        for session in windows:
            await session.close()
    in_process = sum(1 for s in statuses if s["engineMode"] == "inprocess")
    return {"alone": alone, "turns": turns, "together": together, "engines": engines,
            "in_process": in_process, "statuses": statuses}


def report(outcome: dict[str, Any]) -> dict[str, Any]:
    alone, turns, together = outcome["alone"], outcome["turns"], outcome["together"]
    engines = outcome["engines"]
    resident = sum(e["modelLoads"] for e in engines) + outcome["in_process"]
    weights = sum(e["residentBytes"].get("weights", 0) for e in engines)
    p50 = {name: statistics.median(v) for name, v in
           (("alone", alone), ("turns", turns), ("together", together))}
    print(f"{'':<40}{'p50 ms':>10}")
    print(f"{'1 window, model in process':<40}{p50['alone']:>10.2f}")
    print(f"{'3 windows on 1 engine, taking turns':<40}{p50['turns']:>10.2f}")
    print(f"{'3 windows on 1 engine, all at once':<40}{p50['together']:>10.2f}")
    print(f"models resident for 3 windows: {resident} ({weights} weight bytes); engine "
          f"windows connected: {[sum(c != 'bench' for c in e['clients']) for e in engines]}")
    return {
        "resident_models_three_clients": resident,
        "resident_bytes_three_clients": weights,
        "single_client_p50_ms": round(p50["alone"], 3),
        "three_client_p50_ms": round(p50["turns"], 3),
        "three_client_p50_ratio": round(p50["turns"] / p50["alone"], 3),
        "three_client_concurrent_p50_ms": round(p50["together"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--device", help="cpu, cuda, ...")
    parser.add_argument("--requests", type=int, default=20, help="timed requests per phase")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="mf-lsp-bench-"))
    folder.chmod(0o700)
    os.environ[RUNTIME_DIR_ENV] = str(folder)  # the servers and their engine live here
    try:
        outcome = asyncio.run(run(args.model, args.device, args.requests))
    except (ClientError, EngineError, OSError, RuntimeError, asyncio.TimeoutError) as exc:
        print(f"shared LSP bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for engine in engines_in(folder):  # do not wait for its idle exit
            with contextlib.suppress(ProcessLookupError):
                os.kill(engine["pid"], signal.SIGTERM)
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(report(outcome)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

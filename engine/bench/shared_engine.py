"""Shared-engine benchmark: one resident model for several clients.

    python -m engine.bench.shared_engine [--model PATH] [--device cpu] [--quick]

1. Three LSP clients on one engine (`python -m lsp_server.tools.shared_bench`, a subprocess: the
   engine never imports LSP code): models resident, resident bytes, and the p50 round trip
   of requests taking turns between three windows against one in-process client's p50.
2. A load test on a private Unix socket: 4 clients x 200 requests, every 4th cancelled
   shortly after it is sent and every 8th superseded by a newer request for the same key;
   each answer that is not cancelled must be exactly the text that request got alone (no lost
   or cross-wired responses). Bounded in count and time.

Prints a table, then one JSON line with `resident_models_three_clients`,
`three_client_p50_ratio` and `load_test_errors`. `run_shared_bench` returns the same dict.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from engine.api import CompletionRequest, EngineError
from engine.bench.json_part import run_json_part
from engine.serve.client import EngineConnection

LOAD_CLIENTS = 4
LOAD_REQUESTS = 200
LOAD_TIME_LIMIT_S = 45.0  # the load test stops sending after this long, whatever the count
CODE = [
    "def add(a, b):\n    return a + b\n",
    "def is_even(n):\n    return n % 2 == 0\n",
    "def greet(name):\n    message = 'Hello, ' + name\n    return message\n",
    "def total(items):\n    result = 0\n    for item in items:\n        result += item\n"
    "    return result\n",
]


def bench_requests(count: int = 12) -> list[CompletionRequest]:
    """Distinct deterministic holes cut from small functions (any model can answer them)."""
    out = []
    for i in range(count):
        code = CODE[i % len(CODE)]
        cut = max(1, len(code) // 2 - (i // len(CODE)) * 3)
        out.append(CompletionRequest(prefix=f"# case {i}\n" + code[:cut], suffix=code[cut:],
                                     max_tokens=16, stop="line", timeout_ms=600_000))
    return out


def start_engine(model: str, device: str, folder: Path) -> tuple[subprocess.Popen, Path]:
    sock = folder / "bench.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--model", model, "--device", device,
         "--socket", str(sock), "--cache-size", "0"],  # every request must reach the model
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if not process.stdout.readline():
        process.wait(30)
        raise EngineError("the bench engine did not start")
    return process, sock


def stop_engine(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)
    if process.stdout:
        process.stdout.close()


def load_test(sock: Path, requests: list[CompletionRequest], expected: list[str], *,
              clients: int = LOAD_CLIENTS, per_client: int = LOAD_REQUESTS,
              time_limit_s: float = LOAD_TIME_LIMIT_S) -> dict[str, Any]:
    """Hammer one engine from `clients` connections; count what went wrong."""
    counts = {"sent": 0, "answered": 0, "cancelled": 0, "errors": 0, "cross_wired": 0}
    lock = threading.Lock()
    stop_at = time.monotonic() + time_limit_s

    def check(index: int, result) -> None:
        with lock:
            counts["answered"] += 1
            if result.stats.cancelled:
                counts["cancelled"] += 1
            elif result.text != expected[index]:
                counts["cross_wired"] += 1

    def failed(exc: Exception) -> None:
        with lock:
            counts["errors"] += 1
        print(f"load test: {exc}", file=sys.stderr)

    def client(n: int) -> None:
        try:
            connection = EngineConnection.unix(sock, name=f"load-{n}")
        except (OSError, EngineError) as exc:
            failed(exc)
            return
        try:
            for i in range(per_client):
                if time.monotonic() > stop_at:
                    break
                index = (n * 5 + i * 7) % len(requests)
                with lock:
                    counts["sent"] += 1
                try:
                    if i % 8 == 7:  # two for one key, the older superseded by the engine
                        older = (index + 1) % len(requests)
                        with lock:
                            counts["sent"] += 1
                        side = threading.Thread(target=lambda o=older: check(
                            o, connection.complete(requests[o], key="doc")))
                        side.start()
                        check(index, connection.complete(requests[index], key="doc"))
                        side.join()
                    elif i % 4 == 3:  # cancelled ~5 ms after it was sent
                        flag = threading.Event()
                        flag.set()
                        check(index, connection.complete(requests[index], flag))
                    else:
                        check(index, connection.complete(requests[index]))
                except EngineError as exc:
                    failed(exc)
        finally:
            connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts["lost"] = counts["sent"] - counts["answered"] - counts["errors"]
    counts["seconds"] = round(time.perf_counter() - started, 2)
    return counts


def expected_answers(sock: Path, requests: list[CompletionRequest]) -> list[str]:
    connection = EngineConnection.unix(sock, name="reference")
    try:
        _wait_ready(connection)
        return [connection.complete(r).text for r in requests]
    finally:
        connection.close()


def _wait_ready(connection: EngineConnection, timeout_s: float = 600.0) -> None:
    from engine.serve.launcher import wait_ready

    wait_ready(connection, timeout_s)


def lsp_clients(model: str, device: str, requests: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "lsp_server.tools.shared_bench", "--model", model,
               "--device", device, "--requests", str(requests)]
    figures, before = run_json_part(command)
    for line in before:
        print(line)
    return figures


def run_shared_bench(model_path: str, device: str = "cpu", *, quick: bool = False
                     ) -> dict[str, Any]:
    """Both parts; returns the JSON line's fields (see the module docstring)."""
    lsp = lsp_clients(model_path, device, 8 if quick else 20)
    folder = Path(tempfile.mkdtemp(prefix="mf-bench-"))
    folder.chmod(0o700)
    process = None
    try:
        process, sock = start_engine(model_path, device, folder)
        requests = bench_requests()
        expected = expected_answers(sock, requests)
        load = load_test(sock, requests, expected,
                         per_client=40 if quick else LOAD_REQUESTS)
    finally:
        if process is not None:
            stop_engine(process)
        shutil.rmtree(folder, ignore_errors=True)
    print(f"load test: {LOAD_CLIENTS} clients, {load['sent']} requests in {load['seconds']} s: "
          f"{load['answered']} answered ({load['cancelled']} cancelled), {load['errors']} "
          f"errors, {load['lost']} lost, {load['cross_wired']} cross-wired")
    return {
        **lsp,
        "load_test_requests": load["sent"],
        "load_test_cancelled": load["cancelled"],
        "load_test_errors": load["errors"] + load["lost"] + load["cross_wired"],
        "load_test_seconds": load["seconds"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    args = parser.parse_args(argv)
    model = args.model
    if model is None:
        from engine.model.embedded_model import default_model_path

        found = default_model_path()
        if found is None:
            print("no --model and no embedded model", file=sys.stderr)
            return 2
        model = str(found)
    try:
        result = run_shared_bench(model, args.device, quick=args.quick)
    except (EngineError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"shared-engine bench failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

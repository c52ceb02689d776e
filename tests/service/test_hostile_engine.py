"""The shared engine under a hostile or careless client (issue 20, part A), through the real
`maskfill-engine serve` process: one client's big request must not starve the others, a
waiting request ends at its deadline, a client that floods the socket and never reads is
disconnected before it grows the engine, out-of-range fields are refused at the door with
their name, and client mistakes are not counted as engine errors. Deadlines here are hang
guards only; the assertions are about order and outcome."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from engine.api import CompletionRequest, CompletionResult
from engine.serve.client import EngineConnection
from engine.serve.launcher import wait_ready
from engine.serve.protocol import (
    Complete,
    Hello,
    Result,
    StatusQuery,
    Welcome,
    decode_server,
    encode,
    frame_length,
)
from tests.service.conftest import slow_request, wait_http_ready

LOAD_S = 180.0
HANG_GUARD_S = 300.0


def big_request(steps: int = 80, prefix: str = "def add(a, b):\n", **knobs) -> CompletionRequest:
    """Eight sampled candidates over five hole lengths: 40 rows, more than the CPU's 32-row
    batch (the issue's n=8, max_tokens=180, temperature 1), one token per step."""
    return CompletionRequest(
        prefix=prefix, suffix="", max_tokens=steps,
        span_lengths=tuple(range(steps - 4, steps + 1)), stop="free", sampler="low_confidence",
        steps=steps, temperature=1.0, num_candidates=8, **{"timeout_ms": 600_000, **knobs})


def small_request(timeout_ms: float = 60_000) -> CompletionRequest:
    return CompletionRequest(prefix="x = 1\n", suffix="", max_tokens=4, timeout_ms=timeout_ms)


class Call(threading.Thread):
    """One completion on its own thread; `result` once done, `finished_at` its order."""

    def __init__(self, connection: EngineConnection, request: CompletionRequest):
        super().__init__(daemon=True)
        self.connection, self.request = connection, request
        self.result: CompletionResult | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.connection.complete(self.request)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def answer(self) -> CompletionResult:
        self.join(HANG_GUARD_S)
        assert not self.is_alive(), "no answer (hang)"
        assert self.error is None, self.error
        return self.result


def wait_running(connection: EngineConnection, jobs: int = 1) -> None:
    deadline = time.monotonic() + 60
    while not (connection.status().stats["running"] and
               connection.status().stats["queueDepth"] >= jobs):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.01)


@pytest.fixture
def slow_engine(slow_model, serve_engine, runtime_dir):
    """(socket path, engine) serving the random-weight 2048-token model."""
    sock = runtime_dir / "e.sock"
    engine = serve_engine(slow_model, "--socket", str(sock), "--cache-size", "0")
    first = EngineConnection.unix(sock, name="probe")
    wait_ready(first, LOAD_S)
    first.close()
    return sock, engine


def test_a_big_request_does_not_hold_back_another_clients_small_one(slow_engine):
    sock, _ = slow_engine
    script = EngineConnection.unix(sock, name="script")
    editor = EngineConnection.unix(sock, name="editor")
    big = Call(script, big_request())
    wait_running(editor)
    time.sleep(0.5)  # well into its passes
    small = editor.complete(small_request())
    assert big.is_alive(), "the small request was answered only after the big one"
    assert not small.stats.timed_out and small.stats.forward_passes > 0
    assert small.stats.batch_rows > 1  # it shared passes with the big one's rows
    done = big.answer()
    assert not done.stats.timed_out and not done.stats.cancelled
    assert len(done.candidates) >= 1
    script.close()
    editor.close()


def test_a_request_that_cannot_start_ends_at_its_deadline(slow_engine):
    """Four 8-row requests fill the CPU's 32-row batch; a fifth that does not fit beside them
    waits, and its deadline ends that wait with an explicit timed-out answer while the others
    still run."""
    sock, _ = slow_engine
    clients = [EngineConnection.unix(sock, name=f"script{i}") for i in range(5)]
    fillers = [Call(clients[i], dataclasses.replace(
        big_request(steps=80 - i), num_candidates=1,
        span_lengths=tuple(range(73 - i, 81 - i)))) for i in range(4)]
    wait_running(clients[4], jobs=4)
    time.sleep(0.5)  # each admitted at the pass after it came (a pass: ~50 ms here)
    # The fillers run ~3.5 s on a quiet 2-core machine (longer under load); the late request's
    # deadline must end well before them (at 1.5 s a quiet run once saw a filler end first).
    late = clients[4].complete(small_request(timeout_ms=500))
    assert all(call.is_alive() for call in fillers), \
        "the waiting request was answered only after the batch drained"
    assert late.stats.timed_out and not late.stats.cancelled
    assert late.text == "" and late.candidates == []
    for call in fillers:
        assert not call.answer().stats.timed_out
    for client in clients:
        client.close()


def test_a_request_queued_behind_the_in_flight_limit_ends_at_its_deadline(
        slow_model, serve_engine, runtime_dir):
    sock = runtime_dir / "e.sock"
    serve_engine(slow_model, "--socket", str(sock), "--max-in-flight", "1")
    script = EngineConnection.unix(sock, name="script")
    editor = EngineConnection.unix(sock, name="editor")
    wait_ready(editor, LOAD_S)
    running = Call(script, slow_request())
    wait_running(editor)
    queued = editor.complete(small_request(timeout_ms=500))
    assert running.is_alive(), "the queued request was answered only after the running one"
    assert queued.stats.timed_out and queued.text == ""
    stats = editor.status().stats
    assert stats["requests"]["timed_out"] == 1
    script.close()
    editor.close()


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _hello(sock_path) -> socket.socket:
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(30)
    raw.connect(str(sock_path))
    raw.sendall(encode(Hello(client="flood")))
    header = raw.recv(4, socket.MSG_WAITALL)
    assert isinstance(decode_server(raw.recv(frame_length(header), socket.MSG_WAITALL)), Welcome)
    return raw


def _closed_by_peer(raw: socket.socket, payload: bytes) -> bool:
    """Write `payload` without reading a reply; True once the engine hangs up on us."""
    raw.settimeout(HANG_GUARD_S)
    try:
        raw.sendall(payload)
    except (BrokenPipeError, ConnectionResetError):
        return True
    raw.settimeout(60)
    try:  # it read everything: a hang-up shows as the end of what it sent before
        while raw.recv(1 << 20):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX") or not __import__("os").path.exists(
    "/proc/self/status"), reason="needs Unix sockets and /proc")
def test_a_client_that_floods_status_queries_and_never_reads_is_dropped(memorized_model,
                                                                        serve_engine,
                                                                        runtime_dir):
    sock = runtime_dir / "e.sock"
    engine = serve_engine(memorized_model, "--socket", str(sock))
    editor = EngineConnection.unix(sock, name="editor")
    wait_ready(editor, LOAD_S)
    pid = editor.welcome.pid
    before = _rss_bytes(pid)
    query = encode(StatusQuery(id=1))
    flood = _hello(sock)
    assert _closed_by_peer(flood, query * (10 * 1024 * 1024 // len(query)))  # 10 MB
    flood.close()
    grown = _rss_bytes(pid) - before
    assert grown < 64 * 1024 * 1024, f"the engine grew by {grown / 2**20:.0f} MiB"
    assert engine.process.poll() is None
    assert editor.complete(small_request()).text is not None  # the others are still served
    editor.close()


def test_a_client_that_floods_completions_is_dropped_and_its_jobs_with_it(slow_engine):
    sock, _ = slow_engine
    editor = EngineConnection.unix(sock, name="editor")
    flood = _hello(sock)
    request = slow_request()
    payload = b"".join(encode(Complete(id=i, request=request)) for i in range(1, 1001))
    assert _closed_by_peer(flood, payload)
    flood.close()
    deadline = time.monotonic() + 60
    while editor.status().stats["queueDepth"]:  # its queued and running jobs went with it
        assert time.monotonic() < deadline, "the flood's jobs stayed queued"
        time.sleep(0.05)
    assert not editor.complete(small_request()).stats.timed_out
    editor.close()


def _raw_result(sock_path, request: CompletionRequest) -> Result:
    raw = _hello(sock_path)
    raw.sendall(encode(Complete(id=7, request=request)))
    header = raw.recv(4, socket.MSG_WAITALL)
    reply = decode_server(raw.recv(frame_length(header), socket.MSG_WAITALL))
    raw.close()
    assert isinstance(reply, Result) and reply.id == 7
    return reply


@pytest.mark.parametrize("field, value", [("seed", 2**64 - 1), ("seed", 2**63),
                                          ("max_context_tokens", 2**64 - 1)])
def test_an_out_of_range_integer_on_the_socket_is_refused_naming_it(memorized_model,
                                                                    serve_engine, runtime_dir,
                                                                    field, value):
    sock = runtime_dir / "e.sock"
    serve_engine(memorized_model, "--socket", str(sock))
    editor = EngineConnection.unix(sock, name="editor")
    wait_ready(editor, LOAD_S)
    request = dataclasses.replace(small_request(), temperature=0.5, **{field: value})
    reply = _raw_result(sock, request)
    assert reply.result is None and reply.error is not None and field in reply.error
    requests = editor.status().stats["requests"]
    assert requests["rejected"] == 1 and requests["error"] == 0
    assert editor.complete(small_request()).text is not None  # still serving
    editor.close()


def _post(url: str, token: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url + "/v1/fim/completions", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=HANG_GUARD_S) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def _metrics(url: str, token: str) -> dict[str, float]:
    request = urllib.request.Request(url + "/metrics",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("maskfill_requests_total{"):
            label, value = line.split(" ")
            out[label.split('"')[1]] = float(value)
    return out


@pytest.fixture
def http_engine(memorized_model, serve_engine, runtime_dir):
    token_file = runtime_dir / "tok"
    engine = serve_engine(memorized_model, "--no-socket", "--http", "127.0.0.1:0",
                          "--token-file", str(token_file))
    url, token = engine.endpoints["http"], token_file.read_text().strip()
    wait_http_ready(url, seconds=LOAD_S)
    return url, token


@pytest.mark.parametrize("seed", [2**64, -(2**64), 2**63])
def test_an_out_of_range_seed_over_http_is_a_400_naming_it(http_engine, seed):
    url, token = http_engine
    status, body = _post(url, token, {"prompt": "def add(a, b):\n", "max_tokens": 4,
                                      "seed": seed})
    assert status == 400, body
    assert "seed" in body["error"]["message"]
    status, body = _post(url, token, {"prompt": "def add(a, b):\n", "max_tokens": 4, "seed": 5})
    assert status == 200, body  # a seed in range is served, the engine up


def test_client_mistakes_are_counted_apart_from_engine_errors(http_engine):
    url, token = http_engine
    status, body = _post(url, token, {"prompt": "x", "max_tokens": 300})  # window: 256
    assert status == 400 and "max_tokens" in body["error"]["message"]
    status, _ = _post(url, token, {"prompt": "def add(a, b):\n", "max_tokens": 4, "seed": 2})
    assert status == 200
    for _ in range(2):  # the same deterministic request again: a cache hit
        assert _post(url, token, {"prompt": "def add(a, b):\n", "max_tokens": 4,
                                  "seed": 2})[0] == 200
    counts = _metrics(url, token)
    assert counts["rejected"] == 1 and counts["error"] == 0
    assert counts["ok"] == 1 and counts["cached"] == 2


@pytest.mark.parametrize("nth", [1, 3, 6])  # the context encode, the first passes, later
def test_a_cancel_stops_a_big_request_within_one_layer(slow_model, nth):
    """In process (the layer calls are counted by hooks on the real model): the cancel is set
    while the nth call of the first layer runs; no layer may start after it. Before, the
    context encode and the pass under way always ran to their end (4.9 s seen on n=8)."""
    import torch

    from engine.engine import Engine

    torch.set_num_threads(1)
    engine = Engine.load(str(slow_model))
    cancel = threading.Event()
    first_layer_calls, after_cancel = [0], [0]

    def count(index: int):
        def hook(module, args) -> None:
            if cancel.is_set():
                after_cancel[0] += 1
            if index == 0:
                first_layer_calls[0] += 1
                if first_layer_calls[0] == nth:
                    cancel.set()
        return hook

    layers = engine._loaded.model.layers
    handles = [layer.register_forward_pre_hook(count(i)) for i, layer in enumerate(layers)]
    try:
        result = engine.complete(big_request(steps=40, prefix="def add(a, b):\n" * 40),
                                 cancel)
    finally:
        for handle in handles:
            handle.remove()
        engine.close()
    assert first_layer_calls[0] >= nth and result.stats.cancelled and result.text == ""
    assert after_cancel[0] == 0, f"{after_cancel[0]} layers ran after the cancel"

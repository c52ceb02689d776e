"""The language server's side: the worker's engine factory, the shared engine across a
restart, cancellation from the worker reaching the engine, and the remote HTTP backend."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from concurrent.futures import Future

import pytest

from engine.api import CompletionRequest, EngineAuthError, EngineError
from engine.serve.client import EngineConnection
from engine.serve.host import ServiceHost
from engine.serve.launcher import EngineLocation
from engine.serve.server import EngineService
from lsp_server.engine_client import RemoteEngine, SharedEngine, resolve_mode
from lsp_server.engine_host import LoadSpec, LspEngineHost
from tests.service.conftest import fim_answer, memorized_hole, slow_request, wait_gone

TOKEN = "remote-token"  # the remote tests' bearer token (token_file writes it)
WAIT_S = 180.0


@pytest.mark.parametrize(("mode", "device", "resolved"), [
    ("auto", "cuda", "shared"), ("auto", "cuda:1", "shared"), ("auto", "cpu", "inprocess"),
    ("auto", "mps", "inprocess"), ("shared", "cpu", "shared"), ("remote", "cuda", "remote"),
    ("inprocess", "cuda", "inprocess")])
def test_engine_mode_defaults_to_shared_on_a_gpu(mode, device, resolved):
    assert resolve_mode(mode, device) == resolved


def wait_for(predicate, what: str, seconds: float = WAIT_S) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def engine_stats(model, device="cpu") -> dict:
    connection = EngineConnection.unix(EngineLocation(str(model), device, "none").socket,
                                       name="probe")
    try:
        return connection.status().stats
    finally:
        connection.close()


def test_worker_in_shared_mode_serves_and_cancels_across_the_socket(slow_model, runtime_dir):
    worker = LspEngineHost()  # the real loader: it picks the shared engine from the spec
    try:
        worker.load(LoadSpec(model=str(slow_model), mode="shared", idle_exit_s=10))
        wait_for(lambda: worker.state in ("ready", "failed"), "the load")
        assert worker.state == "ready", worker.error
        assert worker.info.family == "dream" and worker.info.weight_bytes > 0
        first = worker.submit("file:///a.py", slow_request())
        wait_for(lambda: engine_stats(slow_model)["running"], "the job to run")
        second = worker.submit("file:///a.py", CompletionRequest(prefix="x = ", suffix="",
                                                                 max_tokens=4))
        # Newest wins: the superseded request gets the engine's cancelled answer, or none when
        # the engine takes longer than the client's short grace to confirm (issue 20: the newer
        # request is never held behind it). Either way the engine stopped it.
        superseded = first.future.result(60)
        assert superseded is None or superseded.stats.cancelled
        assert not second.future.result(60).stats.cancelled
        wait_for(lambda: engine_stats(slow_model)["requests"]["cancelled"] == 1,
                 "the engine to count the superseded request cancelled")
        assert engine_stats(slow_model)["requests"]["ok"] == 1
    finally:
        worker.close()


def test_an_engine_killed_mid_request_is_restarted_for_the_next(slow_model, runtime_dir):
    engine = SharedEngine.open(LoadSpec(model=str(slow_model), mode="shared", idle_exit_s=10))
    try:
        first_pid = engine.engine_pid
        outcome: Future = Future()

        def run() -> None:
            try:
                outcome.set_result(engine.complete(slow_request()))
            except Exception as exc:
                outcome.set_exception(exc)

        threading.Thread(target=run).start()
        wait_for(lambda: engine_stats(slow_model)["running"], "the job to run")
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(EngineError, match="shared engine stopped"):
            outcome.result(60)
        assert wait_gone(first_pid)
        result = engine.complete(CompletionRequest(prefix="x = ", suffix="", max_tokens=4))
        assert not result.stats.cancelled
        assert engine.engine_pid not in (None, first_pid)
    finally:
        engine.close()


class HttpEngine:
    """The engine's HTTP app on 127.0.0.1:<free port>, on an event loop in a thread."""

    def __init__(self, model, token: str):
        import torch

        from engine.engine import Engine
        from engine.serve.http_api import start_http

        torch.set_num_threads(1)
        self.scheduler = ServiceHost(lambda: Engine.load(str(model)))
        assert self.scheduler.wait_loaded(WAIT_S) and self.scheduler.state == "ready"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever)
        self.thread.start()

        async def start():
            service = EngineService(self.scheduler, token=token)
            return await start_http(service, "127.0.0.1", 0, max_body_bytes=1 << 20)

        self.runner, self.url = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()
        self.scheduler.close()


def test_remote_backend_completes_through_the_fim_api(memorized_model, token_file):
    server = HttpEngine(memorized_model, TOKEN)
    try:
        engine = RemoteEngine.open(server.url, str(token_file), None)
        # The FIM shape has no exact hole length: the engine tries buckets up to max_tokens,
        # as for tests/service/test_http_api.py's first test, on the same snippet.
        request, _ = memorized_hole(memorized_model, 2)
        expected = fim_answer(memorized_model, request)
        result = engine.complete(request)
        assert expected and result.text == expected and result.candidates[0].text == expected
        assert engine.info().device == "remote" and engine.info().path == server.url
        line = engine.complete(CompletionRequest(prefix=request.prefix, suffix=request.suffix,
                                                 max_tokens=request.max_tokens, stop="line"))
        assert "\n" not in line.text
    finally:
        server.close()


def test_remote_backend_reports_a_wrong_token_and_a_readable_token_file(memorized_model,
                                                                        token_file):
    server = HttpEngine(memorized_model, "another-token")
    try:
        engine = RemoteEngine.open(server.url, str(token_file), None)  # /health is open
        with pytest.raises(EngineAuthError, match="refused the token \\(401: missing or wrong"):
            engine.complete(CompletionRequest(prefix="x", suffix=""))
        token_file.chmod(0o644)
        with pytest.raises(EngineError, match="readable by others"):
            RemoteEngine.open(server.url, str(token_file), None)
    finally:
        server.close()


def test_an_unreachable_remote_endpoint_fails_the_load_clearly(runtime_dir):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    worker = LspEngineHost()
    try:
        worker.load(LoadSpec(model=None, mode="remote", endpoint=f"http://127.0.0.1:{port}"))
        wait_for(lambda: worker.state in ("ready", "failed"), "the load")
        assert worker.state == "failed"
        assert f"remote engine at http://127.0.0.1:{port} is unreachable" in worker.error
    finally:
        worker.close()
    with pytest.raises(EngineError, match="must be an http"):
        RemoteEngine.open("ftp://x", None, None)
    with pytest.raises(EngineError, match="engineEndpoint is not set"):
        RemoteEngine.open(None, None, None)


class SocketTimerFirst(RemoteEngine):
    """The race made certain: the socket's own timer (0.05 s) notices a silent endpoint
    before the call's deadline does (with equal limits it wins most short calls)."""

    def _connection(self, timeout: float):
        return super()._connection(min(timeout, 0.05))


def test_a_silent_remote_endpoint_is_asked_once_whichever_timer_notices():
    """A silent endpoint is unavailable, never retried at half the span: one model run."""
    events: list[tuple[str, dict]] = []
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; no answer
        engine = SocketTimerFirst(f"http://127.0.0.1:{silent.getsockname()[1]}", None, None)
        worker = LspEngineHost(loader=lambda spec: engine,
                               on_event=lambda kind, payload: events.append((kind, payload)))
        try:
            worker.load(LoadSpec(model=None, mode="remote"))
            wait_for(lambda: worker.state == "ready", "the load")
            job = worker.submit("file:///a.py", CompletionRequest(
                prefix="def f():\n", suffix="", max_tokens=16, timeout_ms=3000))
            assert job.future.result(WAIT_S) is None
            assert worker.stats.model_runs == 1 and worker.stats.failures == 1
            said = [p["message"] for kind, p in events if kind == "engine-error"]
            assert len(said) == 1 and "gave no answer" in said[0], said
        finally:
            worker.close()


def test_remote_cancel_hangs_up_and_the_engine_stops_the_job(slow_model):
    server = HttpEngine(slow_model, "t")
    try:
        engine = RemoteEngine(server.url, "t", None)
        cancel = threading.Event()
        outcome: Future = Future()
        threading.Thread(target=lambda: outcome.set_result(
            engine.complete(slow_request(), cancel))).start()
        wait_for(lambda: server.scheduler.busy, "the job to run")
        cancel.set()
        assert outcome.result(60).stats.cancelled
        wait_for(lambda: server.scheduler.stats.outcomes["cancelled"] == 1, "the engine stop")
        assert server.scheduler.stats.outcomes["ok"] == 0
    finally:
        server.close()

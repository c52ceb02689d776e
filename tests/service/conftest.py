"""Fixtures for the shared-engine tests: a short private runtime folder (Unix socket paths are
limited to ~100 bytes) whose engines are stopped at teardown, and a helper that starts
`maskfill-engine serve` and reads the endpoints line it prints once listening."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from engine.serve.client import EngineConnection

STOP_WAIT_S = 15.0
CONNECT_WAIT_S = 60.0  # a hang guard only
HTTP_LOAD_WAIT_S = 180.0  # a hang guard for an HTTP engine's model load


@pytest.fixture
def token_file(tmp_path: Path, request) -> Path:
    """The test module's TOKEN in a private file, as `--token-file` and the editors read it."""
    path = tmp_path / "token"
    path.write_text(request.module.TOKEN + "\n")
    path.chmod(0o600)
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int, seconds: float = STOP_WAIT_S) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):  # reap it when it is our child
            os.waitpid(pid, os.WNOHANG)
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def stop_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_gone(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid)


def engine_pids(folder: Path) -> list[int]:
    """Pids of the engines answering on the sockets in `folder`."""
    pids = []
    for sock in folder.glob("*.sock"):
        try:
            connection = EngineConnection.unix(sock, name="teardown")
        except OSError:
            continue
        pids.append(connection.welcome.pid)
        connection.close()
    return pids


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch):
    folder = Path(tempfile.mkdtemp(prefix="mf-"))
    monkeypatch.setenv("MASKFILL_RUNTIME_DIR", str(folder))
    started: list[int] = []
    yield folder
    for pid in {*engine_pids(folder), *started}:
        stop_pid(pid)
    shutil.rmtree(folder, ignore_errors=True)


class ServedEngine:
    def __init__(self, process: subprocess.Popen, endpoints: dict):
        self.process = process
        self.endpoints = endpoints

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(STOP_WAIT_S)


@pytest.fixture
def serve_engine(runtime_dir):
    """start(model, *args) -> ServedEngine; every engine it started is stopped afterwards."""
    served: list[ServedEngine] = []

    def start(model: Path, *args: str) -> ServedEngine:
        process = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--model", str(model), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = process.stdout.readline()
        if not line:
            process.wait(STOP_WAIT_S)
            raise AssertionError(f"engine did not start: {process.stderr.read()}")
        engine = ServedEngine(process, json.loads(line))
        served.append(engine)
        return engine

    yield start
    for engine in served:
        engine.stop()
        for stream in (engine.process.stdout, engine.process.stderr):
            stream.close()


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight checkpoint with a 2048-token window: with the one-token-per-step
    reference sampler, a 384-token hole takes hundreds of forward passes, so a test can act
    while a job is surely running. Its output means nothing; only its duration is used."""
    from tests.fixtures.checkpoints import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("slow"))


def slow_request(prefix: str = "def add(a, b):\n"):
    from engine.api import CompletionRequest

    return CompletionRequest(prefix=prefix, suffix="", max_tokens=384, span_lengths=(384,),
                             stop="free", sampler="low_confidence", steps=384, use_cache=False,
                             timeout_ms=600_000)


def memorized_hole(model: Path, index: int = 0):
    """(request, middle): the middle half of a memorized snippet as a hole of its length."""
    from engine.api import CompletionRequest
    from engine.model.tokenizer import Tokenizer
    from tests.fixtures.memorized import SNIPPETS, split_middle

    tokenizer = Tokenizer.from_dir(model)
    snippet = SNIPPETS[index]
    n = len(tokenizer.encode(snippet))
    start, end = n // 4, (3 * n) // 4
    prefix, middle, suffix = split_middle(tokenizer, snippet, start, end)
    request = CompletionRequest(prefix=prefix, suffix=suffix, span_lengths=(end - start,),
                                max_tokens=end - start, stop="free", timeout_ms=600_000)
    return request, middle


def fim_answer(model: Path, request) -> str:
    """What the engine itself answers for `request` shaped as the FIM API sends it (no exact
    hole length: the engine tries its buckets up to max_tokens). Which bucket wins is the
    engine's business; the API must pass that answer through unchanged."""
    import torch

    from engine.engine import Engine

    torch.set_num_threads(1)
    engine = Engine.load(str(model))
    try:
        return engine.complete(dataclasses.replace(request, span_lengths=None)).text
    finally:
        engine.close()


def wait_http_ready(url: str, context=None, seconds: float = HTTP_LOAD_WAIT_S) -> None:
    """Poll `url`/health until the engine has loaded its model (200; 503 with state "loading"
    while it loads, and a refused or reset connection while it starts); `context`: an
    SSLContext for https. Any other state (a failed load) fails at once, with the body."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5, context=context) as answer:
                if answer.status == 200:
                    return
        except urllib.error.HTTPError as answer:
            body = answer.read().decode("utf-8", "replace")
            try:
                state = json.loads(body).get("state")
            except ValueError:
                state = None
            assert state == "loading", f"the engine at {url} answered {answer.code}: {body}"
        except (urllib.error.URLError, OSError):
            pass
        assert time.monotonic() < deadline, f"the engine at {url} did not load its model"
        time.sleep(0.1)


def connect_unix(path: Path) -> EngineConnection:
    """The editors' connection, retried while the engine is busy refusing a flood (its
    handshake waits 10 s for the engine's welcome)."""
    deadline = time.monotonic() + CONNECT_WAIT_S
    while True:
        try:
            return EngineConnection.unix(path, name="editor")
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)

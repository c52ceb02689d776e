"""The language server's shared and remote engine modes under attack (issue 20 items 1, 3, 4 and
the remote 401): each through the real processes, the real `maskfill-lsp` over stdio against a
real `maskfill-engine serve` (or the engine's real HTTP app), on the tiny memorized checkpoint.

Deadlines here are hang guards, never measurements: a request with timeoutMs 3000 must have
answered before HANG_GUARD_S, which is far below what a hung engine used to cost (timeout +
30 s, then a retry at half length)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web
from lsprotocol import types

from engine.serve.client import EngineConnection
from engine.serve.launcher import EngineLocation
from tests.e2e.server_session import (
    VSCODE,
    inline,
    open_document,
    replace,
    start,
    status,
    stop,
    wait_ready,
)
from tests.fixtures.memorized import SNIPPETS
from tests.service.conftest import wait_http_ready

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc, sends SIGSTOP")

TOKEN = "hostile-token"
TIMEOUT_MS = 3000
HANG_GUARD_S = TIMEOUT_MS / 1000 + 9  # well past timeout + the answer margin; far below +30 s
PREFIX = "def is_even(n):\n"
BODY = next(s for s in SNIPPETS if s.startswith(PREFIX))[len(PREFIX):].rstrip("\n")


@pytest.fixture
def http_engine(serve_engine, memorized_model, token_file):
    """A real `maskfill-engine serve --http` process with the memorized model."""
    engine = serve_engine(memorized_model, "--no-socket", "--http", "127.0.0.1:0",
                          "--token-file", str(token_file))
    wait_http_ready(engine.endpoints["http"])
    return engine


@contextlib.contextmanager
def stopped(pid: int):
    """SIGSTOP the engine for the block; SIGCONT whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def get(url: str, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def continue_headers(api_key: str) -> dict[str, str]:
    """continuedev/continue core/llm/llms/OpenAI.ts `_getHeaders()`, as `listModels()` and the
    vLLM provider's `_setupCompletionOptions()` send them with GET `<apiBase>/models`."""
    return {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}",
            "api-key": api_key}


def remote_settings(url: str, token: Path, **extra) -> dict:
    return {"engineMode": "remote", "engineEndpoint": url, "engineTokenFile": str(token),
            "timeoutMs": TIMEOUT_MS, **extra}


async def answer_within(awaitable, seconds: float = HANG_GUARD_S):
    return await asyncio.wait_for(awaitable, seconds)


# -- item 1: the remote model's window -----------------------------------------------------------


def test_v1_models_answers_continues_request_with_the_window(http_engine, memorized_model):
    base = http_engine.endpoints["http"]
    status_code, listing = get(base + "/v1/models", continue_headers(TOKEN))
    assert status_code == 200 and listing["object"] == "list"
    (entry,) = listing["data"]
    # Continue's vLLM provider reads data[0].id and parseInt(data[0].max_model_len).
    assert entry["object"] == "model" and entry["owned_by"] == "maskfill"
    assert entry["id"] == memorized_model.resolve().name  # a name, never the checkpoint's path
    assert entry["max_model_len"] == entry["context_length"] == 256  # the memorized window
    assert entry["max_tokens"] == 128  # half the window: the rest is context
    assert get(base + f"/v1/models/{entry['id']}", continue_headers(TOKEN)) == (200, entry)
    missing, error = get(base + "/v1/models/no-such-model", continue_headers(TOKEN))
    assert missing == 404 and "no-such-model" in error["error"]["message"]
    refused, error = get(base + "/v1/models", continue_headers("wrong"))
    assert refused == 401 and error["error"]["type"] == "authentication_error"


async def test_remote_mode_keeps_max_tokens_and_completes_the_whole_body(http_engine,
                                                                        token_file):
    url = http_engine.endpoints["http"]
    client, _ = await start(None, VSCODE, settings=remote_settings(
        url, token_file, maxTokens=48, timeoutMs=120_000))
    try:
        ready = await wait_ready(client)
        assert ready["loadState"] == "ready" and ready["engineMode"] == "remote"
        uri = "file:///w/even.py"
        open_document(client, uri, PREFIX)
        items = await inline(client, uri, 1, 0)
        assert BODY in [item.insert_text for item in items]  # many tokens, not 1
        shown = " ".join(m.message for m in client.messages)
        assert "does not fit" not in shown, shown
        assert (await status(client))["contextWindow"] == 256  # learnt from GET /v1/models
    finally:
        await stop(client)


# -- the remote endpoint refuses the token ---------------------------------------------------------


async def test_a_refused_token_is_said_once_and_never_retried(http_engine, tmp_path):
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    wrong.chmod(0o600)
    client, _ = await start(None, VSCODE, settings=remote_settings(
        http_engine.endpoints["http"], wrong, timeoutMs=120_000))
    try:
        assert (await wait_ready(client))["loadState"] == "ready"  # /health needs no token
        uri = "file:///w/even.py"
        open_document(client, uri, PREFIX)
        assert await answer_within(inline(client, uri, 1, 0)) == []
        after_one = await status(client)
        assert after_one["modelRuns"] == 1  # no second try at half the span
        assert "refused the token" in (after_one["error"] or "")
        replace(client, uri, 2, (1, 0), (1, 0), " ")
        assert await answer_within(inline(client, uri, 1, 1)) == []
        errors = [m.message for m in client.messages if "refused the token" in m.message]
        assert len(errors) == 1 and errors[0].startswith("maskfill: the remote engine")
        assert all(m.type == types.MessageType.Error for m in client.messages
                   if "refused the token" in m.message)
        assert (await status(client))["modelRuns"] == 2
        # The user fixes the token file: the next request uses it, no reload needed.
        wrong.write_text(TOKEN + "\n")
        replace(client, uri, 3, (1, 0), (1, 1), "")
        items = await answer_within(inline(client, uri, 1, 0), 120)
        assert BODY in [item.insert_text for item in items]
        fixed = await status(client)
        assert fixed["error"] is None and fixed["modelRuns"] == 3
    finally:
        await stop(client)


# -- item 3: a hung engine ------------------------------------------------------------------------


def shared_engine_pid(runtime_dir: Path) -> int:
    (sock,) = runtime_dir.glob("*.sock")
    probe = EngineConnection.unix(sock, name="probe")
    try:
        return probe.welcome.pid
    finally:
        probe.close()


async def test_a_stopped_shared_engine_answers_empty_and_newest_wins(memorized_model,
                                                                     runtime_dir):
    client, _ = await start(memorized_model, VSCODE, settings={
        "engineMode": "shared", "engineIdleExitS": 5, "timeoutMs": TIMEOUT_MS})
    try:
        assert (await wait_ready(client))["loadState"] == "ready"
        uri = "file:///w/even.py"
        open_document(client, uri, PREFIX)
        assert BODY in [i.insert_text for i in await answer_within(inline(client, uri, 1, 0),
                                                                   120)]
        pid = shared_engine_pid(runtime_dir)
        with stopped(pid):
            # Typed text the last suggestion does not start with: no cache can answer.
            replace(client, uri, 2, (1, 0), (1, 0), "x")
            first = asyncio.ensure_future(answer_within(inline(client, uri, 1, 1)))
            await asyncio.sleep(0.5)
            replace(client, uri, 3, (1, 1), (1, 1), "y")
            second = asyncio.ensure_future(answer_within(inline(client, uri, 1, 2)))
            assert await first == []  # superseded: not held behind the silent engine
            assert await second == []  # its own deadline, not the older request's
            stuck = await status(client)
        assert stuck["jobsInFlight"] == 0 and stuck["loadState"] == "ready"
        assert stuck["modelRuns"] <= 3  # the warm-up and the two above: no retry
        warned = " ".join(m.message for m in client.messages)
        assert "gave no answer" in warned
        # Resumed, the same engine serves again (another snippet: no cache can answer it).
        other = "file:///w/add.py"
        open_document(client, other, "def add(a, b):\n")
        items = await answer_within(inline(client, other, 1, 0), 120)
        assert "    return a + b" in [i.insert_text for i in items]
        assert shared_engine_pid(runtime_dir) == pid
    finally:
        await stop(client)


async def test_a_stopped_remote_engine_answers_empty_at_its_deadline(http_engine, token_file):
    client, _ = await start(None, VSCODE, settings=remote_settings(
        http_engine.endpoints["http"], token_file))
    try:
        assert (await wait_ready(client))["loadState"] == "ready"
        uri = "file:///w/even.py"
        open_document(client, uri, PREFIX)
        with stopped(http_engine.process.pid):
            assert await answer_within(inline(client, uri, 1, 0)) == []
            after = await status(client)
        assert after["modelRuns"] == 1 and after["jobsInFlight"] == 0  # no retry at half
        assert "gave no answer" in " ".join(m.message for m in client.messages)
    finally:
        await stop(client)


# -- item 4: an engine that dies while starting or loading -----------------------------------------


class EngineKiller:
    """Kills the shared engines the server at `server_pid` starts: the first as soon as it
    exists (it is starting: importing, before it listens), the next once its socket answers
    (it is loading the model, or just ready), up to `kills` of them."""

    def __init__(self, server_pid: int, socket_path: Path, kills: int):
        self.server_pid, self.socket_path, self.kills = server_pid, socket_path, kills
        self.killed: list[tuple[int, str]] = []  # (pid, engine state when killed)
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def engines(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.server_pid and b"engine" in command and b"serve" in command:
                found.append(int(entry.name))
        return found

    def _state(self) -> str | None:
        try:
            probe = EngineConnection.unix(self.socket_path, name="killer")
        except OSError:
            return None
        try:
            return probe.status().state
        except Exception:  # noqa: BLE001 - it may die under us: no state then
            return None
        finally:
            probe.close()

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.killed) < self.kills:
            for pid in self.engines():
                if pid in {p for p, _ in self.killed}:
                    continue
                self.seen.add(pid)
                state = "starting"
                if len(self.killed) % 2 == 1:  # every other one: once it answers on its socket
                    state = self._state()
                    if state is None:
                        continue
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.killed.append((pid, state))
            time.sleep(0.005)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


async def _start_shared_with_killer(model: Path, kills: int):
    client, _ = await start(model, VSCODE, settings={"engineMode": "shared",
                                                     "engineIdleExitS": 5})
    socket_path = EngineLocation(str(model), "cpu", "none").socket
    return client, EngineKiller(client._server.pid, socket_path, kills)


async def test_an_engine_killed_while_loading_is_restarted(memorized_model, runtime_dir):
    client, killer = await _start_shared_with_killer(memorized_model, kills=2)
    try:
        ready = await wait_ready(client, 300)
        assert len(killer.killed) == 2, killer.killed
        assert ready["loadState"] == "ready", ready["error"]
        uri = "file:///w/even.py"
        open_document(client, uri, PREFIX)
        assert BODY in [i.insert_text for i in await inline(client, uri, 1, 0)]
    finally:
        killer.close()
        await stop(client)


async def test_an_engine_that_keeps_dying_fails_the_load_clearly(memorized_model, runtime_dir):
    client, killer = await _start_shared_with_killer(memorized_model, kills=100)
    try:
        failed = await wait_ready(client, 300)
        assert failed["loadState"] == "failed"
        assert "exited while starting or loading the model 3 times" in failed["error"]
        await asyncio.sleep(1.0)  # nothing starts another one behind the user's back
        assert len(killer.seen) == 3, killer.killed
        assert any("exited while starting or loading" in m.message
                   and m.type == types.MessageType.Error for m in client.messages)
    finally:
        killer.close()
        await stop(client)


# -- the session key a cluster routes on ---------------------------------------------------------


class RecordingHttpEngine:
    """The engine's real HTTP app (in this process, memorized model) with a middleware that
    records each FIM request's session header, as a cluster's router would read it."""

    def __init__(self, model: Path):
        import torch

        from engine.engine import Engine
        from engine.serve.host import ServiceHost
        from engine.serve.http_api import build_app
        from engine.serve.server import EngineService

        torch.set_num_threads(1)
        self.scheduler = ServiceHost(lambda: Engine.load(str(model)))
        assert self.scheduler.wait_loaded(180) and self.scheduler.state == "ready"
        self.sessions: list[str | None] = []
        app = build_app(EngineService(self.scheduler, token=TOKEN))

        @web.middleware
        async def record(request: web.Request, handler):
            if request.path.endswith("/completions"):
                self.sessions.append(request.headers.get("x-session-id"))
            return await handler(request)

        app.middlewares.insert(0, record)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def serve():
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return runner, runner.addresses[0][1]

        self.runner, port = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(30)
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.scheduler.close()


async def test_remote_requests_carry_a_session_key_per_document(memorized_model, token_file):
    from engine.serve.cluster.contract import MAX_SESSION_CHARS, SESSION_HEADER

    assert SESSION_HEADER == "x-session-id"
    server = RecordingHttpEngine(memorized_model)
    client = None
    try:
        client, _ = await start(None, VSCODE, settings=remote_settings(
            server.url, token_file, timeoutMs=120_000))
        assert (await wait_ready(client))["loadState"] == "ready"
        uris = ["file:///secret/even.py", "file:///secret/add.py"]
        for uri, text in zip(uris, (PREFIX, "def add(a, b):\n"), strict=True):
            open_document(client, uri, text)
            await inline(client, uri, 1, 0)
        replace(client, uris[0], 2, (1, 0), (1, 0), "x")  # a new context: no cache answers it
        await inline(client, uris[0], 1, 1)
        first, second, again = server.sessions
        assert first and second and first != second and again == first
        assert all(len(s) <= MAX_SESSION_CHARS and "secret" not in s and "even" not in s
                   for s in server.sessions)  # the document's name stays in the editor
    finally:
        if client is not None:
            await stop(client)
        await asyncio.get_running_loop().run_in_executor(None, server.close)

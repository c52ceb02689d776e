"""Ending the server and sharing its port, as hostile or careless clients do it (issue 11;
issue 12.4): `exit` with requests in flight, signals, shutdown while the model loads, a second
TCP client, a weight file that is a FIFO. Each test starts the real server process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time

import pytest

from lsp_server.engine_host import CLOSE_WAIT_S
from tests.e2e.raw_client import LIVENESS_S, Server, connect, free_port, inline_params

INLINE = "textDocument/inlineCompletion"
STATUS = {"command": "maskfill.status"}
URI = "file:///t.py"


def loaded_server(model, tmp_path, *extra: str) -> Server:
    server = Server(["--model", str(model), *extra], tmp_path / "stderr.log")
    server.initialize()
    assert server.wait_loaded()["loadState"] == "ready"
    return server


def test_exit_without_shutdown_while_requests_run_is_quiet(memorized_model, tmp_path):
    server = loaded_server(memorized_model, tmp_path)
    try:
        for index in range(3):  # manual requests on three documents: one runs, two wait
            uri = f"file:///busy{index}.py"
            server.open(uri, "def greet(name):\n")
            server.request(INLINE, inline_params(uri, 1, 0))
        server.notify("exit")
        assert server.wait_exit() == 1  # exit without shutdown
        log = server.stderr()
        assert "Traceback" not in log and "closed file" not in log, log[:2000]
        assert len(log) < 10_000  # was 9.3 MB of nested tracebacks
    finally:
        server.stop()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_request_ends_the_server(memorized_model, tmp_path, signum):
    server = loaded_server(memorized_model, tmp_path)
    try:
        server.open(URI, "def total(items):\n")
        server.request(INLINE, inline_params(URI, 1, 0))
        server.status()  # the request has been read
        server.process.send_signal(signum)
        assert server.wait_exit() == 128 + signum  # never alive and deaf
        assert "Traceback" not in server.stderr()
    finally:
        server.stop()


def shutdown_and_exit(server: Server) -> tuple[int, float]:
    started = time.monotonic()
    server.request("shutdown")
    server.notify("exit")
    code = server.wait_exit()
    return code, time.monotonic() - started


def test_shutdown_and_exit_free_the_model_without_waiting_on_the_engine(
    memorized_model, tmp_path
):
    """Issue 12.4: editors restart the server on a settings change. The exit must not wait
    out the engine thread's join timeout (CLOSE_WAIT_S), neither with the model loaded nor
    while a load (which cannot be interrupted) is still running."""
    log_file = tmp_path / "loaded.log"
    server = loaded_server(memorized_model, tmp_path, "-v", "--log-file", str(log_file))
    try:
        code, elapsed = shutdown_and_exit(server)
        assert code == 0 and elapsed < CLOSE_WAIT_S, elapsed
        assert "model freed" in log_file.read_text(encoding="utf-8")
    finally:
        server.stop()

    gate = tmp_path / "never-opened"  # the load waits for this file: it stays loading
    log_file = tmp_path / "loading.log"
    server = Server(["--model", str(memorized_model), "-v", "--log-file", str(log_file)],
                    tmp_path / "stderr-loading.log", load_gate=gate)
    try:
        server.initialize()
        assert server.status()["loadState"] == "loading"
        code, elapsed = shutdown_and_exit(server)
        assert code == 0 and elapsed < CLOSE_WAIT_S, elapsed
        assert "engine still loading" in log_file.read_text(encoding="utf-8")
    finally:
        server.stop()


def test_tcp_serves_one_client_and_strangers_never_end_its_session(tmp_path):
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text("editor-secret\n")
    token_file.chmod(0o600)
    server = Server(["--tcp", f"127.0.0.1:{port}", "--token-file", str(token_file), "--model",
                     str(tmp_path / "none")], tmp_path / "stderr.log")
    sockets = []
    try:
        probe, _ = connect(port)  # a bare connect-and-close before the editor comes
        probe.close()
        sock, early = connect(port)  # a stranger that came first and lingers
        sockets.append(sock)
        reply = early.call("workspace/executeCommand", STATUS)
        assert reply["error"]["code"] == -32002  # answered on its own socket
        sock, intruder = connect(port)  # another local process, without the token
        sockets.append(sock)
        refused = intruder.call("initialize", {"processId": None, "rootUri": None,
                                               "capabilities": {}, "initializationOptions": {}})
        assert refused["error"]["code"] == -32600 and "token" in refused["error"]["message"]
        intruder.wait_closed()
        sock, editor = connect(port)
        sockets.append(sock)
        editor.initialize(settings={"token": "editor-secret"})
        early.wait_closed()  # the session is the editor's: the stranger is let go
        editor.open(URI, "x = 1\n")
        assert "result" in editor.call("workspace/executeCommand", STATUS)

        sock, stranger = connect(port)  # refused while the editor's session is open
        sockets.append(sock)
        with contextlib.suppress(OSError):
            stranger.request("workspace/executeCommand", STATUS)
        stranger.wait_closed()
        assert stranger.messages == []
        probe, _ = connect(port)  # and a port probe that leaves at once
        probe.close()

        reply = editor.call("workspace/executeCommand", STATUS)  # still the editor's session
        assert "result" in reply and reply["result"]["requests"] == 0
        assert editor.call(INLINE, inline_params(URI, 0, 5))["result"]["items"] == []
        assert editor.call("shutdown")["result"] is None
        editor.notify("exit")
        assert server.wait_exit() == 0
        assert "refused a connection" in server.stderr()
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_weight_file_is_refused_at_once(memorized_model, tmp_path):
    folder = tmp_path / "fifo-model"
    shutil.copytree(memorized_model, folder)
    weights = folder / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    server = Server(["--model", str(folder)], tmp_path / "stderr.log")
    try:
        server.initialize()
        status = server.wait_loaded(timeout=LIVENESS_S)
        assert status["loadState"] == "failed" and "not a regular file" in status["error"]
        code, _ = shutdown_and_exit(server)
        assert code == 0
    finally:
        server.stop()

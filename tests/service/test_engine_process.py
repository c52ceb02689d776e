"""`maskfill-engine serve` as a process: a private socket, answers equal to the memorized
text, cancellation and newest-wins across the socket, the lock and stale sockets, idle exit,
and the token on TCP."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from engine.api import CompletionRequest, EngineError
from engine.serve.client import EngineConnection
from engine.serve.launcher import EngineLocation, connect_or_start, wait_ready
from engine.serve.protocol import MAX_FRAME_BYTES, Refused, decode_server, frame_length
from engine.serve.server import EXIT_ALREADY_RUNNING
from tests.service.conftest import memorized_hole, pid_alive, slow_request, wait_gone

LOAD_S = 180.0


def running_job(connection: EngineConnection, deadline_s: float = 60.0) -> None:
    """Wait until the engine's model thread holds a job."""
    deadline = time.monotonic() + deadline_s
    while not connection.status().stats["running"]:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.01)


def test_private_socket_answers_with_the_memorized_middle(memorized_model, serve_engine,
                                                          runtime_dir):
    sock = runtime_dir / "sub" / "e.sock"
    serve_engine(memorized_model, "--socket", str(sock))
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    connection = EngineConnection.unix(sock, name="test")
    wait_ready(connection, LOAD_S)
    for index in range(3):
        request, middle = memorized_hole(memorized_model, index)
        assert connection.complete(request).text == middle
    status = connection.status()
    assert status.info.weight_bytes > 0 and status.stats["modelLoads"] == 1
    assert status.stats["clients"] == ["test"]
    connection.close()


def test_an_oversized_frame_is_refused_before_it_is_read(memorized_model, serve_engine,
                                                         runtime_dir):
    sock = runtime_dir / "e.sock"
    serve_engine(memorized_model, "--socket", str(sock))
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(30)
    raw.connect(str(sock))
    raw.sendall((MAX_FRAME_BYTES + 1).to_bytes(4, "big"))  # and no body at all
    header = raw.recv(4, socket.MSG_WAITALL)
    reply = decode_server(raw.recv(frame_length(header), socket.MSG_WAITALL))
    assert isinstance(reply, Refused) and "over the" in reply.message
    assert raw.recv(1) == b""  # then the engine hangs up
    raw.close()


def test_cancel_and_newest_wins_reach_the_model_across_the_socket(slow_model, serve_engine,
                                                                  runtime_dir):
    sock = runtime_dir / "e.sock"
    serve_engine(slow_model, "--socket", str(sock))
    connection = EngineConnection.unix(sock, name="test")
    wait_ready(connection, LOAD_S)

    cancel = threading.Event()
    answers: dict[str, object] = {}
    first = threading.Thread(target=lambda: answers.update(
        cancelled=connection.complete(slow_request(), cancel)))
    first.start()
    running_job(connection)
    cancel.set()  # as the worker does on $/cancelRequest
    first.join(60)
    assert answers["cancelled"].stats.cancelled and answers["cancelled"].text == ""

    older = threading.Thread(target=lambda: answers.update(
        older=connection.complete(slow_request("a"), key="file:///doc.py")))
    older.start()
    running_job(connection)
    newer = connection.complete(  # same key, no cancel sent: the engine stops the older one
        CompletionRequest(prefix="x = 1\n", suffix="", max_tokens=4, timeout_ms=600_000),
        key="file:///doc.py")
    older.join(60)
    assert answers["older"].stats.cancelled
    assert not newer.stats.cancelled
    stats = connection.status().stats
    assert stats["requests"]["cancelled"] == 2 and stats["requests"]["ok"] == 1
    connection.close()


def test_a_stale_socket_is_replaced_and_a_second_engine_steps_aside(memorized_model,
                                                                    runtime_dir):
    location = EngineLocation(str(memorized_model), "cpu", "none")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(location.socket))  # what a killed engine leaves behind: a file, no listener
    stale.close()
    assert location.socket.exists()

    connection = connect_or_start(location, "test", idle_exit_s=30)
    wait_ready(connection, LOAD_S)
    request, middle = memorized_hole(memorized_model)
    assert connection.complete(request).text == middle

    second = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--model", str(memorized_model),
         "--lock", str(location.lock), "--socket", str(location.socket)],
        capture_output=True, text=True, timeout=120)
    assert second.returncode == EXIT_ALREADY_RUNNING
    assert "already serves" in second.stderr
    assert connection.complete(request).text == middle  # the first one is untouched
    connection.close()


def test_two_servers_starting_at_once_share_one_engine(memorized_model, runtime_dir):
    location = EngineLocation(str(memorized_model), "cpu", "none")
    connections: list[EngineConnection] = []

    def start() -> None:
        connections.append(connect_or_start(location, "racer", idle_exit_s=30))

    racers = [threading.Thread(target=start) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(LOAD_S)
    assert len(connections) == 2
    assert connections[0].welcome.pid == connections[1].welcome.pid
    wait_ready(connections[0], LOAD_S)
    assert connections[0].status().stats["modelLoads"] == 1
    for connection in connections:
        connection.close()


def test_the_engine_exits_once_idle_and_removes_its_socket(memorized_model, serve_engine,
                                                           runtime_dir):
    sock = runtime_dir / "e.sock"
    engine = serve_engine(memorized_model, "--socket", str(sock), "--idle-exit-s", "0.5")
    connection = EngineConnection.unix(sock, name="test")
    wait_ready(connection, LOAD_S)
    time.sleep(1.0)  # connected clients keep it alive past the idle timeout
    assert engine.process.poll() is None
    connection.close()
    assert engine.process.wait(30) == 0
    assert not sock.exists()


def test_tcp_needs_the_token_from_a_private_file(memorized_model, serve_engine, runtime_dir):
    token_file = runtime_dir / "tok"
    engine = serve_engine(memorized_model, "--no-socket", "--tcp", "127.0.0.1:0",
                          "--token-file", str(token_file))
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    host, _, port = engine.endpoints["tcp"].rpartition(":")
    with pytest.raises(EngineError, match="missing or wrong token"):
        EngineConnection.tcp(host, int(port), token="not-it", name="intruder")
    connection = EngineConnection.tcp(host, int(port), token=token_file.read_text().strip())
    wait_ready(connection, LOAD_S)
    request, middle = memorized_hole(memorized_model)
    assert connection.complete(request).text == middle
    connection.close()


@pytest.mark.parametrize("flag", ["--tcp", "--http"])
def test_a_non_loopback_address_needs_allow_remote(memorized_model, runtime_dir, flag):
    result = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--model", str(memorized_model),
         "--no-socket", flag, "0.0.0.0:0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "not a loopback address" in result.stderr and "--allow-remote" in result.stderr


def test_a_killed_engine_leaves_a_stale_socket_that_the_next_start_replaces(
        memorized_model, runtime_dir):
    location = EngineLocation(str(memorized_model), "cpu", "none")
    connection = connect_or_start(location, "test", idle_exit_s=30)
    pid = connection.welcome.pid
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    assert location.socket.exists()  # nobody removed it
    connection.close()
    again = connect_or_start(location, "test", idle_exit_s=30)
    assert again.welcome.pid != pid and pid_alive(again.welcome.pid)
    wait_ready(again, LOAD_S)
    request, middle = memorized_hole(memorized_model)
    assert again.complete(request).text == middle
    again.close()

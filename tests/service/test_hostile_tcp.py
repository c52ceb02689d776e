"""The engine's msgpack `--tcp` listener under a connection flood (issue 20.6, held like the
HTTP API's): against a real `maskfill-engine serve` whose file limit is low, idle TCP
connections past the cap are refused with a message and closed at once, the editors' Unix
socket answers throughout, and a client with the token is served again once the flood is gone.
Before, the listener had no cap: the flood took every descriptor, `accept` failed for every
listener, and a connection past the limit was never told why."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.serve.client import EngineConnection
from engine.serve.launcher import wait_ready
from engine.serve.protocol import HEADER_BYTES, Refused, decode_server, frame_length
from tests.service.conftest import STOP_WAIT_S, ServedEngine, connect_unix, memorized_hole

HANG_S = 60.0  # hang guards only
LOAD_S = 180.0
FILES = 100  # the engine's file limit (soft and hard)

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="POSIX sockets")


@pytest.fixture
def low_limit_engine(memorized_model, runtime_dir):
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FILES, FILES))

    sock = runtime_dir / "e.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--model", str(memorized_model),
         "--socket", str(sock), "--tcp", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    line = process.stdout.readline()
    if not line:
        process.wait(STOP_WAIT_S)
        raise AssertionError(f"engine did not start: {process.stderr.read()}")
    engine = ServedEngine(process, json.loads(line))
    yield engine, sock
    engine.stop()
    for stream in (process.stdout, process.stderr):
        stream.close()


def refusals(socks: list[socket.socket]) -> list[str]:
    """The messages of the Refused frames the engine sent on `socks` before closing them (one
    it kept open past the hang guard, or closed without a frame, adds none)."""
    told, deadline = [], time.monotonic() + HANG_S
    for sock in socks:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        received = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := sock.recv(65536):
                received += chunk
        if len(received) >= HEADER_BYTES:
            end = HEADER_BYTES + frame_length(received[:HEADER_BYTES])
            message = decode_server(received[HEADER_BYTES:end])
            if isinstance(message, Refused):
                told.append(message.message)
    return told


def test_a_tcp_flood_is_refused_with_a_message_and_leaves_the_unix_socket_answering(
        memorized_model, low_limit_engine):
    engine, sock_path = low_limit_engine
    host, _, port = engine.endpoints["tcp"].rpartition(":")
    token = Path(engine.endpoints["token_file"]).read_text().strip()
    editor = connect_unix(sock_path)
    wait_ready(editor, LOAD_S)
    editor.close()
    flood = []
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):  # a refused one may be reset while connecting
                flood.append(socket.create_connection((host, int(port)), timeout=HANG_S))
        time.sleep(0.5)  # let the engine accept (and refuse) what it will
        editor = connect_unix(sock_path)
        try:
            request, middle = memorized_hole(memorized_model)
            assert editor.complete(request).text == middle  # the Unix socket kept answering
        finally:
            editor.close()
        # Connections past the cap were told so, then closed (the others are closed at the
        # hello timeout, without a word: they never said hello).
        told = refusals(flood)
        assert told and all("too many connections" in m for m in told), told
    finally:
        for raw in flood:
            raw.close()
    deadline = time.monotonic() + HANG_S
    while True:  # the flood's places are freed as the engine sees them closed
        try:
            client = EngineConnection.tcp(host, int(port), token=token, name="script")
            break
        except Exception:
            assert time.monotonic() < deadline, "the TCP listener never served again"
            time.sleep(0.2)
    try:
        request, middle = memorized_hole(memorized_model)
        assert client.complete(request).text == middle
    finally:
        client.close()
    engine.stop()
    log = engine.process.stderr.read()
    assert 1 <= log.count("refused a TCP connection") <= 5, log  # throttled

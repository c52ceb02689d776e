"""The engine client's connection set-up (connect, TLS handshake, hello) under one deadline,
through real sockets against scripted peers on 127.0.0.1 (no model, limits of a few seconds).
Each stage used to get its own 10 s, so a silent endpoint held a connect up to 30 s, and one
that trickled its answer for ever. The bounds on seconds below are hang guards with slack."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import engine.serve.client as client_module
import lsp_server.engine_client as engine_client_module
from engine.api import CompletionRequest, EngineUnavailable
from engine.serve.client import EngineConnection
from engine.serve.protocol import Welcome, encode
from engine.serve.setup_deadline import EngineSetupTimeout, SetupDeadline
from engine.serve.tls import client_context, server_context
from lsp_server.engine_client import SharedEngine, _connect_endpoint
from lsp_server.engine_host import LoadSpec
from tests.fixtures.certificates import self_signed

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX sockets")

TOKEN = "deadline-token"
LIMIT_S = 2.0  # the set-up limit where one stage alone is silent (room for a loaded peer
# thread to accept and shake hands before it, so the stage named is the silent one)
HANG_GUARD_S = 30.0


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path / "engine-cert")


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The set-up limit the LSP's own connect (`_connect_endpoint`) uses, made small."""
    monkeypatch.setattr(client_module, "SETUP_TIMEOUT_S", LIMIT_S)


@contextlib.contextmanager
def peer(script: Callable[[socket.socket], None]) -> Iterator[int]:
    """A listener whose first connection runs `script` on a thread; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    connections: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        connections.append(conn)
        conn.settimeout(HANG_GUARD_S)
        with contextlib.suppress(OSError), conn:  # ssl.SSLError is an OSError
            script(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(HANG_GUARD_S)


def until_closed(conn: socket.socket) -> None:
    """Read (never answer) until the client hangs up."""
    while conn.recv(4096):
        pass


def shakes_hands_then_silent(certificate: tuple[Path, Path], after_s: float = 0.0):
    def script(conn: socket.socket) -> None:
        time.sleep(after_s)  # a slow TLS server: this much of the deadline is used up
        with server_context(*certificate).wrap_socket(conn, server_side=True) as tls:
            until_closed(tls)
    return script


def test_a_peer_that_accepts_and_never_speaks_tls_is_left_at_the_deadline(
        token_file, certificate, small_limit):
    with peer(until_closed) as port, pytest.raises(
            EngineSetupTimeout, match=rf"tls://127\.0\.0\.1:{port} gave no answer within "
                                      r"2\.0 s while shaking hands \(TLS\)"):
        _connect_endpoint(f"tls://127.0.0.1:{port}", str(token_file), str(certificate[0]))


def test_a_tls_peer_that_never_sends_welcome_is_left_at_the_deadline(
        token_file, certificate, small_limit):
    with peer(shakes_hands_then_silent(certificate)) as port, pytest.raises(
            EngineSetupTimeout, match=rf"tls://127\.0\.0\.1:{port} gave no answer within "
                                      r"2\.0 s while waiting for its Welcome"):
        _connect_endpoint(f"tls://127.0.0.1:{port}", str(token_file), str(certificate[0]))


def test_a_plain_peer_that_never_sends_welcome_is_left_at_the_deadline(token_file,
                                                                       small_limit):
    with peer(until_closed) as port, pytest.raises(
            EngineSetupTimeout, match=rf"tcp://127\.0\.0\.1:{port} gave no answer within "
                                      r"2\.0 s while waiting for its Welcome"):
        _connect_endpoint(f"tcp://127.0.0.1:{port}", str(token_file))


def test_the_handshake_and_the_hello_share_one_deadline(certificate, monkeypatch):
    """A server that takes 2 s to shake hands and then never says Welcome: every wait for the
    Welcome is armed with at most what the handshake left of the one limit (load only makes
    it less). Before, the hello got a full limit of its own after the handshake."""
    limit_s, handshake_after_s = 6.0, 2.0
    armed: list[tuple[str, float]] = []  # (stage, seconds a blocking call was given)
    left = SetupDeadline.left

    def recording(self: SetupDeadline) -> float:
        seconds = left(self)
        armed.append((self.stage, seconds))
        return seconds

    monkeypatch.setattr(SetupDeadline, "left", recording)
    with peer(shakes_hands_then_silent(certificate, handshake_after_s)) as port:
        started = time.monotonic()
        with pytest.raises(EngineSetupTimeout, match="while waiting for its Welcome"):
            EngineConnection.tcp("127.0.0.1", port, token=TOKEN, name="probe",
                                 tls=client_context(certificate[0]), setup_s=limit_s)
        assert time.monotonic() - started < HANG_GUARD_S
    hello = [seconds for stage, seconds in armed if "Welcome" in stage]
    assert hello, armed
    assert max(hello) <= limit_s - handshake_after_s, armed


def test_a_welcome_trickled_a_byte_at_a_time_is_left_at_the_deadline():
    """Each read gets what the ones before it left: a peer that sends one byte of its
    Welcome every 0.1 s (about 6 s in all) never reaches the client past the 1 s limit.
    Before, each read had its own limit and the connect succeeded after the whole trickle."""
    welcome = encode(Welcome(version=1, pid=1, state="ready"))

    def trickle(conn: socket.socket) -> None:
        conn.recv(4096)  # the hello
        for byte in welcome:
            time.sleep(0.1)
            conn.sendall(bytes([byte]))
        until_closed(conn)

    with peer(trickle) as port, pytest.raises(
            EngineSetupTimeout, match=r"within 1\.0 s while waiting for its Welcome"):
        EngineConnection.tcp("127.0.0.1", port, token=TOKEN, name="probe", setup_s=1.0)
    assert len(welcome) * 0.1 > 3.0  # the trickle outlasts the limit with room to spare


def test_a_request_waits_its_own_deadline_and_then_learns_why_the_setup_failed(
        token_file, monkeypatch):
    """The shared engine's caller: a request whose deadline is shorter than the set-up limit
    answers nothing at its own deadline (the set-up goes on for the next requests, on its
    own thread); once the set-up has failed, requests answer at once with its reason."""
    monkeypatch.setattr(client_module, "SETUP_TIMEOUT_S", 6.0)
    monkeypatch.setattr(engine_client_module, "ANSWER_SLACK_S", 0.2)
    request = CompletionRequest(prefix="x = ", suffix="", max_tokens=4, timeout_ms=100)
    with peer(until_closed) as port:
        endpoint = f"tcp://127.0.0.1:{port}"
        engine = SharedEngine(LoadSpec(model=None, mode="shared", endpoint=endpoint,
                                       token_file=str(token_file)), "")
        try:
            started = time.monotonic()
            with pytest.raises(EngineUnavailable, match="restarting"):
                engine.complete(request)
            # its own 0.3 s ("restarting": the set-up had not failed), well before the set-up's 6 s
            assert time.monotonic() - started < 5.0
            deadline = time.monotonic() + HANG_GUARD_S
            while True:  # each try answers by its own deadline until the set-up has failed
                with pytest.raises(EngineUnavailable) as failed:
                    engine.complete(request)
                if "could not be restarted" in str(failed.value):
                    break
                assert time.monotonic() < deadline, "the set-up never failed"
            assert (f"the engine at {endpoint} gave no answer within 6.0 s while waiting "
                    "for its Welcome") in str(failed.value)
            with pytest.raises(EngineUnavailable, match="could not be restarted"):
                engine.complete(request)  # the same failure, told at once
        finally:
            engine.close()

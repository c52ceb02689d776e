"""Pre-warm in shared mode (issue 23): the LSP server hands a changed extra-context block to
the engine process over the socket (a fire-and-forget Prewarm message), only when the
engine's Welcome names it; an engine of an older install would drop the connection on a
message it does not know, so none is sent to it."""

from __future__ import annotations

import socket
import threading

import msgspec
import pytest

from engine.api import CompletionRequest
from engine.serve.client import EngineConnection
from engine.serve.protocol import (
    HEADER_BYTES,
    Cancel,
    Complete,
    Hello,
    Prewarm,
    Refused,
    StatusQuery,
    encode,
    frame_length,
)
from tests.e2e.test_server_context import _first_request_after_an_open

SHARED = {"engineMode": "shared", "engineIdleExitS": 2}


def _engine_stats(runtime_dir) -> dict:
    [path] = runtime_dir.glob("*.sock")
    probe = EngineConnection.unix(path, name="probe")
    try:
        return probe.status().stats
    finally:
        probe.close()


@pytest.mark.asyncio
async def test_a_block_changed_while_idle_is_prewarmed_in_the_engine_process(
        memorized_model, runtime_dir):
    """Through the real processes: the server in shared mode, the engine it started. After
    an open while the user idles, the first request carrying the new block reuses context
    the engine process encoded ahead of it."""
    warm = await _first_request_after_an_open(
        memorized_model, idle_s=1.0, settings=SHARED,
        encoded=lambda: (_engine_stats(runtime_dir)["prewarmsEncoded"] or 0) >= 1)
    assert warm["engineMode"] == "shared"
    assert warm["prewarms"] == 1  # handed over the socket
    assert warm["lastReusedContextTokens"] > 0, warm


class _OldEngine:
    """A socket peer that speaks protocol 1 as an engine of an older install does: its
    Welcome has no capabilities, and a message it does not know is refused and the
    connection closed (decode_client's FrameError in engine/serve/server.py)."""

    class Welcome(msgspec.Struct, tag="welcome", kw_only=True):  # the older Welcome's fields
        version: int
        pid: int
        state: str
        error: str | None = None

    decoder = msgspec.msgpack.Decoder(Hello | Complete | Cancel | StatusQuery)  # no Prewarm

    def __init__(self) -> None:
        self.ours, theirs = socket.socketpair()
        self.received: list[str] = []
        self._thread = threading.Thread(target=self._serve, args=(theirs,), daemon=True)
        self._thread.start()

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            while header := sock.recv(HEADER_BYTES, socket.MSG_WAITALL):
                body = sock.recv(frame_length(header), socket.MSG_WAITALL)
                if not self.received:
                    sock.sendall(encode(self.Welcome(version=1, pid=1, state="ready")))
                try:
                    message = self.decoder.decode(body)
                except msgspec.DecodeError:
                    self.received.append("unknown")
                    sock.sendall(encode(Refused(message="bad message")))
                    return
                self.received.append(type(message).__name__)

    def join(self) -> None:
        self._thread.join(10)


def test_no_prewarm_is_sent_to_an_engine_that_does_not_name_it():
    old = _OldEngine()
    connection = EngineConnection(old.ours, name="new client")
    request = CompletionRequest(prefix="x = ", suffix="")
    assert not connection.can_prewarm
    assert connection.prewarm(request) is False
    connection._send(Complete(id=99, request=request))  # something it does know
    old.ours.shutdown(socket.SHUT_WR)
    old.join()
    assert old.received == ["Hello", "Complete"]  # no Prewarm reached it


def test_an_older_engine_drops_the_connection_on_a_prewarm():
    """Why the client checks: the same older peer, sent a Prewarm anyway, closes."""
    old = _OldEngine()
    connection = EngineConnection(old.ours, name="new client")
    connection._send(Prewarm(request=CompletionRequest(prefix="x = ", suffix="")))
    old.join()
    assert old.received == ["Hello", "unknown"]
    for _ in range(100):
        if not connection.alive:
            break
        threading.Event().wait(0.05)
    assert not connection.alive and "bad message" in connection.lost

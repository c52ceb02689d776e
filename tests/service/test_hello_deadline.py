"""The `--tcp` listener's one deadline from accept (engine/serve/server.py, Python 3.11+): the
TLS handshake's time is taken from the hello's, so a client that is slow to shake hands and
then silent holds its capped slot no longer than a silent plain one. In process, on the
connection handler itself: the handshake takes a known time and the hello wait's timeout is
read, so no wall-clock bound is asserted (a loaded machine only makes the handshake longer,
and the hello's share shorter still)."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from engine.serve.server import EngineService

LIMIT_S = 1.0  # the engine's --hello-timeout-s here
HANDSHAKE_S = 0.4  # how long the client's TLS handshake takes


class SlowHandshakeWriter:
    """A just-accepted plain connection whose start_tls takes HANDSHAKE_S (at least: the
    event loop may run it later, never sooner); its client then says nothing."""

    def __init__(self) -> None:
        self.handshakes = 0
        self.closed = False

    def get_extra_info(self, name: str, default=None):
        return {"peername": ("127.0.0.1", 40000)}.get(name, default)

    async def start_tls(self, context, *, ssl_handshake_timeout=None) -> None:
        self.handshakes += 1
        await asyncio.sleep(HANDSHAKE_S)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    async def drain(self) -> None:
        return None


@pytest.mark.skipif(not hasattr(asyncio.StreamWriter, "start_tls"),
                    reason="Python 3.10: the listener does the handshake, before the deadline")
async def test_the_hello_wait_gets_what_the_tls_handshake_left_of_the_limit(monkeypatch):
    service = EngineService(None, token="t", tcp_tls=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
                            hello_timeout_s=LIMIT_S)
    timeouts: list[float] = []
    wait_for = asyncio.wait_for

    async def timed_wait_for(awaitable, timeout):
        timeouts.append(timeout)
        return await wait_for(awaitable, timeout)

    monkeypatch.setattr(asyncio, "wait_for", timed_wait_for)
    writer = SlowHandshakeWriter()
    reader = asyncio.StreamReader()  # the client never sends its hello
    await wait_for(service.tcp_connection(reader, writer, limit=4), 60.0)  # a hang guard
    assert writer.handshakes == 1 and writer.closed  # shook hands, then dropped for silence
    assert len(timeouts) == 1  # the hello wait
    # the full limit (the old code) would be LIMIT_S: the handshake's time is taken from it
    assert timeouts[0] <= LIMIT_S - HANDSHAKE_S
    assert service.tcp_open == 0

"""The server's byte streams: stdio or one loopback TCP client, read through FrameDecoder.

Replaces pygls' start_io/start_tcp, which (a) trust the Content-Length header (framing.py),
(b) read stdin in a ThreadPoolExecutor thread that Python joins at exit, so the process stays
alive until the client writes again or closes the pipe, (c) let every TCP connection take over
the one protocol object, and end the server when any of them leaves.

Here stdin is read by a daemon thread, writes after the stream is gone are dropped silently,
and `--tcp` serves one client: the first connection to send `initialize` owns the session, a
connection made while it is open is refused, and one that leaves before `initialize` (a port
probe) neither takes the session nor ends the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

from engine.serve.log_throttle import ThrottledLog, flush_all
from engine.serve.paths import token_matches
from lsp_server.framing import FrameDecoder
from lsp_server.rpc import error_frame, peek

if TYPE_CHECKING:
    from lsp_server.server import MaskfillServer

log = logging.getLogger(__name__)
# A stranger can open connections as fast as it likes: one log line each would flood the log.
refused_log = ThrottledLog(log, "connections refused")

READ_BYTES = 1 << 16
_QUEUED_CHUNKS = 8  # stdin chunks waiting for the event loop: a flood blocks the reader thread


class StreamWriter:
    """pygls' writer interface over a binary stream; after a failed write or close() every
    later write is dropped (late answers once the client has gone are not errors)."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self.closed = False

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError) as exc:  # a broken pipe, or a stream closed under us
            self.closed = True
            log.info("the client's stream is closed (%s); later messages are dropped", exc)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError, ValueError):
                self._stream.close()


class SocketWriter:
    """The same over an asyncio StreamWriter (writes are buffered by the transport)."""

    def __init__(self, writer: asyncio.StreamWriter):
        self._writer = writer

    def write(self, data: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)

    def close(self) -> None:
        self._writer.close()


def serve_stdio(server: MaskfillServer, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Serve until `exit`, end of input, a signal or the editor's death."""
    asyncio.run(_serve_stdio(server, stdin, stdout))


def serve_tcp(server: MaskfillServer, host: str, port: int, token: str) -> None:
    asyncio.run(_serve_tcp(server, host, port, token))


def _reader_of(stdin: BinaryIO) -> Callable[[], bytes]:
    read1 = getattr(stdin, "read1", None)
    if read1 is not None:
        return lambda: read1(READ_BYTES)
    fd = stdin.fileno()
    return lambda: os.read(fd, READ_BYTES)


def _pump(read: Callable[[], bytes], loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
    """Reader thread: hand stdin's chunks to the event loop; b"" marks the end."""
    chunk = b""
    try:
        while chunk := read():
            asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result()
    except Exception as exc:  # a closed stream or a closed loop: either way, input has ended
        log.debug("stdin reader stopped: %s", exc)
    with contextlib.suppress(RuntimeError):  # the loop may be gone already
        loop.call_soon_threadsafe(queue.put_nowait, b"")


async def _serve_stdio(server: MaskfillServer, stdin: BinaryIO, stdout: BinaryIO) -> None:
    loop = asyncio.get_running_loop()
    server.begin_serving(loop)
    writer = StreamWriter(stdout)
    server.protocol.set_writer(writer)
    chunks: asyncio.Queue[bytes] = asyncio.Queue(_QUEUED_CHUNKS)
    threading.Thread(
        target=_pump, args=(_reader_of(stdin), loop, chunks), name="maskfill-stdin", daemon=True
    ).start()

    async def read() -> None:
        decoder = FrameDecoder()
        while chunk := await chunks.get():
            if await _feed(server, decoder, chunk):
                return
        server.stop_serving("end of input")

    reading = asyncio.ensure_future(read())
    await server.stopped.wait()
    reading.cancel()
    writer.close()


async def _feed(server: MaskfillServer, decoder: FrameDecoder, data: bytes) -> bool:
    """Dispatch every message `data` completes; True once the server is stopping.

    The loop runs once between messages, as when they arrive apart: a request's handler
    starts (and takes its snapshot) before the next message, say its $/cancelRequest or a
    didChange, is handled."""
    for body in decoder.feed(data):
        try:
            server.protocol.receive(body)
        except Exception:  # a bug handling one message must not stop the reading
            log.exception("failed to handle a message")
        if server.stopping:
            return True
        await asyncio.sleep(0)
    return server.stopping


TOKEN_REFUSED = ("maskfill: this TCP server needs initializationOptions.token, the token in its "
                 "--token-file (by default the shared engine's token file)")


def has_token(body: bytes, token: str) -> bool:
    """Whether an `initialize` body carries `token` in initializationOptions (flat, or nested
    under "maskfill" like the other settings); compared in constant time."""
    try:
        options = json.loads(body).get("params", {}).get("initializationOptions") or {}
    except (ValueError, AttributeError):
        return False
    if not isinstance(options, dict):
        return False
    nested = options.get("maskfill")
    sent = options.get("token", nested.get("token") if isinstance(nested, dict) else None)
    return isinstance(sent, str) and token_matches(sent, token)  # "\ud800" too (issue 20.8)


async def _serve_tcp(server: MaskfillServer, host: str, port: int, token: str) -> None:
    """One session: the first connection to send `initialize` with the token (as
    initializationOptions.token) while none is open. Until then a connection is only a
    candidate, answered on its own socket (requests get ServerNotInitialized), so a port probe
    or a stranger can neither take the session over nor, by leaving, end it; an `initialize`
    without the right token is refused and its connection closed. While a session is open,
    new connections are closed at once."""
    loop = asyncio.get_running_loop()
    server.begin_serving(loop)
    session: asyncio.StreamWriter | None = None
    candidates: set[asyncio.StreamWriter] = set()

    def admit(writer: asyncio.StreamWriter) -> None:
        nonlocal session
        session = writer
        candidates.discard(writer)
        server.protocol.set_writer(SocketWriter(writer))
        for other in candidates:  # they came too late
            refused_log.warning("closed a second connection: this server serves one client")
            other.close()
        candidates.clear()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if session is not None:
            refused_log.warning("refused a connection from %s: this server serves one client",
                                peer)
            writer.close()
            return
        candidates.add(writer)
        decoder = FrameDecoder()
        try:
            while data := await reader.read(READ_BYTES):
                if session is writer:
                    if await _feed(server, decoder, data):
                        break
                    continue
                for index, body in enumerate(bodies := decoder.feed(data)):
                    method, msg_id = peek(body)
                    if method == "initialize" and session is None:
                        if not has_token(body, token):
                            refused_log.warning(
                                "refused an initialize from %s: missing or wrong token", peer)
                            writer.write(error_frame(msg_id, -32600, TOKEN_REFUSED))
                            await writer.drain()
                            writer.close()
                            return
                        admit(writer)
                        for pending in bodies[index:]:  # initialize and what followed it
                            server.protocol.receive(pending)
                        break
                    if method == "exit" or session is not None:
                        writer.close()
                        return
                    if msg_id is not None:
                        writer.write(error_frame(msg_id, -32002, "maskfill: not initialized"))
                if server.stopping:
                    break
        except OSError as exc:
            log.info("connection from %s failed: %s", peer, exc)
        finally:
            candidates.discard(writer)
            writer.close()
            if session is writer:
                server.stop_serving("the client disconnected")

    listener = await asyncio.start_server(connection, host, port)
    log.info("serving on %s", ", ".join(str(s.getsockname()) for s in listener.sockets))
    async with listener:
        await server.stopped.wait()
    flush_all()

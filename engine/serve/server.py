"""`maskfill-engine serve`: one process owns the model and serves every client.

Clients speak the framed msgpack protocol (protocol.py) over a per-user Unix socket, or over
loopback TCP with a token; tools speak HTTP (http_api.py, optional). The process holds an
exclusive lock per model+device+quant for its lifetime, so a second engine for the same key
steps aside and a socket file left by a crashed engine is known to be stale and replaced.
With an idle timeout it exits once no client has been connected for that long.

A client is held to its share: at most MAX_CLIENT_JOBS completions unanswered and
MAX_UNSENT_BYTES of replies it has not read. One that goes past either (a script that floods
requests, a client that writes and never reads) is told why and disconnected, so it cannot
grow the engine's memory; the warning is logged at most once per LOG_EVERY_S.

The `--tcp` listener is held like the HTTP API's (issue 20.6): at most `tcp_max_connections`
open at once (fewer under a low file limit, so the editors' Unix socket always has descriptors
left), a connection past the cap is told why in a Refused frame and closed at once (the
refusal logged, throttled), and one that has not said hello within `hello_timeout_s` of being
accepted is closed. With `--tls-cert/--tls-key` it speaks TLS: the handshake runs inside the
capped connection (so handshakes count against the cap) and, on Python 3.11+, within the same
deadline as the hello (a silent TLS client holds a slot no longer than a silent plain one); on
Python 3.10 (no StreamWriter.start_tls) the listener does the handshake, with its own
`hello_timeout_s`, before the hello's deadline starts. A failed handshake (a plain client, a
client that does not trust the certificate) closes the connection, logged throttled.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import os
import signal
import socket
import ssl
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from engine.api import EngineError, EngineInputError
from engine.request_checks import validate
from engine.serve import paths
from engine.serve.connection_cap import ACCEPT_BACKLOG, connection_limit
from engine.serve.host import Job, ServiceHost
from engine.serve.log_throttle import ThrottledLog, flush_all, throttle_accept_errors
from engine.serve.protocol import (
    CAPABILITIES,
    HEADER_BYTES,
    PROTOCOL_VERSION,
    Cancel,
    ClientMessage,
    Complete,
    FrameError,
    Hello,
    Prewarm,
    Refused,
    Result,
    StatusQuery,
    StatusReply,
    Welcome,
    decode_client,
    encode,
    frame_length,
)
from engine.serve.setup_deadline import HELLO_TIMEOUT_S
from engine.serve.tls import server_context

log = logging.getLogger(__name__)
# What strangers can make the engine log, one line per connection otherwise (issue 20.10).
refused_log = ThrottledLog(log, "connections refused")
closed_log = ThrottledLog(log, "connections closed for bad frames")
over_cap_log = ThrottledLog(log, "TCP connections refused (over the connection cap)")
handshake_log = ThrottledLog(log, "TCP connections closed for a failed TLS handshake")

EXIT_ALREADY_RUNNING = 3  # another engine holds this key's lock: use that one
FAILED_EXIT_S = 2.0  # a failed load lingers this long without clients (they read the error)
LOOPBACK_NAMES = ("localhost",)
# Per connection. An editor has a few requests in flight and reads every answer at once.
MAX_CLIENT_JOBS = 64
MAX_UNSENT_BYTES = 8 * 1024 * 1024
LOG_EVERY_S = 10.0


class ClientOverLimit(Exception):
    """A client went past its share of queued jobs or unsent replies: it is disconnected."""


class LogThrottle:
    """One warning per `every` seconds; the ones held back are counted into the next."""

    def __init__(self, every: float = LOG_EVERY_S):
        self.every, self.last, self.held = every, -float("inf"), 0

    def warning(self, message: str, *args) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            self.held += 1
            return
        held, self.held, self.last = self.held, 0, now
        log.warning(message + (f" (and {held} more like it)" if held else ""), *args)


@dataclass
class ServeOptions:
    model: str
    device: str = "cpu"
    quant: str = "none"
    socket: Path | None = None  # Unix socket; None on platforms without AF_UNIX
    lock: Path | None = None
    tcp: tuple[str, int] | None = None  # msgpack protocol over TCP (token required)
    http: tuple[str, int] | None = None  # HTTP FIM API (token required)
    token_file: Path | None = None
    allow_remote: bool = False  # bind a non-loopback TCP/HTTP address
    idle_exit_s: float = 0.0  # 0: never exit for idleness
    endpoint_file: Path | None = None  # JSON of where this engine listens, written 0600
    cache_size: int = 256
    max_body_bytes: int = 1024 * 1024
    # Jobs handed to the engine at once: it batches them into shared denoising passes.
    max_in_flight: int = 8
    tls_cert: Path | None = None  # --http over HTTPS and --tcp over TLS with these PEM files
    tls_key: Path | None = None
    http_read_timeout_s: float = 15.0  # request head, body, idle keep-alive (each)
    http_max_connections: int = 128  # fewer under a low file limit
    tcp_max_connections: int = 128  # --tcp connections, likewise
    http_allowed_hosts: tuple[str, ...] = ()  # Host names served on loopback besides its own
    hello_timeout_s: float = HELLO_TIMEOUT_S  # accept to hello (3.11+: TLS handshake included)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536 or not host:
        raise EngineError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


class EngineService:
    """Connections, status and idle tracking around one ServiceHost."""

    def __init__(self, scheduler: ServiceHost, *, token: str | None = None,
                 idle_exit_s: float = 0.0, tcp_tls: ssl.SSLContext | None = None,
                 hello_timeout_s: float = HELLO_TIMEOUT_S):
        self.scheduler = scheduler
        self.hello_timeout_s = hello_timeout_s
        self.token = token
        self.tcp_tls = tcp_tls  # the --tcp listener's TLS, done per connection
        self.idle_exit_s = idle_exit_s
        self.started = time.monotonic()
        self.clients: dict[int, str] = {}
        self.http_in_flight = 0
        self.last_activity = time.monotonic()
        self.stopped = asyncio.Event()
        self.writers: set[asyncio.StreamWriter] = set()
        self.tcp_open = 0  # connections on the --tcp listener, hello said or not
        self._ids = itertools.count(1)
        self.over_limit_log = LogThrottle()

    # -- shared by both front ends -------------------------------------------------------

    def new_client(self, name: str) -> int:
        client = next(self._ids)
        self.clients[client] = name
        self.touch()
        return client

    def forget_client(self, client: int) -> None:
        self.scheduler.drop_client(client)
        self.clients.pop(client, None)
        self.touch()

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def token_ok(self, offered: str | None) -> bool:
        if self.token is None:
            return False  # TCP without a configured token is never served
        return paths.token_matches(offered, self.token)

    def resident_bytes(self) -> dict[str, int]:
        info = self.scheduler.info
        out = {"weights": info.weight_bytes if info else 0}
        if info and info.device.startswith("cuda"):
            import torch  # only an engine that already runs on CUDA gets here

            out["cuda_reserved"] = int(torch.cuda.memory_reserved(torch.device(info.device)))
        return out

    def status(self) -> dict[str, Any]:
        s = self.scheduler
        return {
            "pid": os.getpid(),
            "state": s.state,
            "error": s.error,
            "info": msgspec.to_builtins(s.info) if s.info else None,
            "clients": sorted(self.clients.values()),
            "queueDepth": s.queue_depth(),  # queued + running
            "running": s.busy,
            "residentBytes": self.resident_bytes(),
            "uptimeS": round(time.monotonic() - self.started, 1),
            **s.stats.snapshot(),
            "prewarmsEncoded": s.prewarms_encoded,
        }

    async def watch_idle(self) -> None:
        """Set `stopped` once no client is connected, nothing runs and idle_exit_s passed
        (FAILED_EXIT_S after a failed load: a later start may well succeed)."""
        while not self.stopped.is_set():
            failed = self.scheduler.state == "failed"
            limit = FAILED_EXIT_S if failed else self.idle_exit_s
            await asyncio.sleep(min(1.0, limit / 4) if limit > 0 else 1.0)
            busy = self.clients or self.http_in_flight or self.scheduler.queue_depth()
            if busy or limit <= 0:
                self.touch()
            elif time.monotonic() - self.last_activity >= limit:
                log.info("no client for %.1f s: exiting", limit)
                self.stopped.set()

    def disconnect_all(self) -> None:
        for writer in list(self.writers):
            writer.close()

    # -- the msgpack protocol ------------------------------------------------------------

    async def tcp_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             *, limit: int) -> None:
        """A `--tcp` connection: served while fewer than `limit` are open, else refused."""
        if self.tcp_open >= limit:
            over_cap_log.warning("refused a TCP connection from %s: %d are open (the cap)",
                                 writer.get_extra_info("peername"), limit)
            with contextlib.suppress(Exception):
                writer.write(encode(Refused(message=f"too many connections: {limit} are open "
                                            "(this engine's cap); try again later")))
                writer.close()
            return
        self.tcp_open += 1
        # One deadline from accept (3.11+): the handshake's time is taken from the hello's.
        hello_by = asyncio.get_running_loop().time() + self.hello_timeout_s
        try:
            if self.tcp_tls is not None and writer.get_extra_info("sslcontext") is None:
                try:
                    await writer.start_tls(self.tcp_tls,
                                           ssl_handshake_timeout=self.hello_timeout_s)
                except (OSError, ssl.SSLError, asyncio.TimeoutError, EOFError) as exc:
                    why = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
                    handshake_log.warning("closing a TCP connection from %s: the TLS handshake "
                                          "failed (%s)", writer.get_extra_info("peername"), why)
                    writer.transport.abort()
                    return
            await self.connection(reader, writer, needs_token=True, hello_by=hello_by)
        finally:
            self.tcp_open -= 1

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         *, needs_token: bool, hello_by: float | None = None) -> None:
        """Serve one client; its hello must come by `hello_by` (loop time; default
        hello_timeout_s from now)."""
        loop = asyncio.get_running_loop()
        if hello_by is None:
            hello_by = loop.time() + self.hello_timeout_s
        client: int | None = None
        self.writers.add(writer)
        unanswered: set[int] = set()  # its completions not yet answered

        def send(message: msgspec.Struct) -> None:
            if writer.is_closing():
                return
            writer.write(encode(message))
            unsent = writer.transport.get_write_buffer_size()
            if unsent > MAX_UNSENT_BYTES:
                self._over_limit(writer, f"{unsent} bytes of replies unread (the limit is "
                                 f"{MAX_UNSENT_BYTES})")

        def answered(job_id: int, message: Result) -> None:
            unanswered.discard(job_id)
            send(message)

        def reply_from_any_thread(job_id: int):
            def reply(result, error) -> None:
                message = Result(id=job_id, result=result, error=error)
                with contextlib.suppress(RuntimeError):  # loop closed: nobody to tell
                    loop.call_soon_threadsafe(answered, job_id, message)
            return reply

        try:
            hello = await asyncio.wait_for(read_message(reader),
                                           max(0.0, hello_by - loop.time()))
            refusal = self._check_hello(hello, writer, needs_token)
            if refusal is not None:
                refused_log.warning("connection refused: %s", refusal)
                send(Refused(message=refusal))
                return
            assert isinstance(hello, Hello)
            client = self.new_client(hello.client or "anonymous")
            s = self.scheduler
            send(Welcome(version=PROTOCOL_VERSION, pid=os.getpid(), state=s.state, error=s.error,
                         capabilities=CAPABILITIES))
            while (message := await read_message(reader)) is not None:
                self.touch()
                if writer.is_closing():  # dropped over a limit while this was read
                    return
                if isinstance(message, Complete):
                    refusal = self._refusal(message)
                    if refusal is not None:
                        s.stats.record_outcome("rejected")
                        send(Result(id=message.id, error=refusal))
                        continue
                    if len(unanswered) >= MAX_CLIENT_JOBS:
                        self._over_limit(writer, f"more than {MAX_CLIENT_JOBS} completions "
                                         "unanswered")
                        return
                    unanswered.add(message.id)
                    s.submit(Job(client=client, id=message.id, key=message.key,
                                 request=message.request, reply=reply_from_any_thread(message.id)))
                elif isinstance(message, Cancel):
                    s.cancel(client, message.id)
                elif isinstance(message, Prewarm):
                    # No reply: a refused or impossible pre-warm costs the client nothing.
                    if self._refusal(message) is None:
                        s.prewarm(message.request)
                elif isinstance(message, StatusQuery):
                    status = self.status()
                    send(StatusReply(id=message.id, state=status["state"], error=status["error"],
                                     info=s.info, stats=status))
                else:
                    send(Refused(message=f"unexpected {type(message).__name__} message"))
                    return
        except FrameError as exc:
            with contextlib.suppress(Exception):
                send(Refused(message=str(exc)))
            closed_log.warning("closing a connection: %s", exc)
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a client that went away or never said hello
        finally:
            self.writers.discard(writer)
            if client is not None:
                self.forget_client(client)
            with contextlib.suppress(Exception):
                await writer.drain()
                writer.close()

    def _refusal(self, message: Complete | Prewarm) -> str | None:
        """Why a request is refused at the door (its bad field named), before it is queued."""
        info = self.scheduler.info
        try:
            validate(message.request, info.max_context if info is not None else None)
        except EngineInputError as exc:
            return str(exc)
        return None

    def _over_limit(self, writer: asyncio.StreamWriter, why: str) -> None:
        """Disconnect a client past its share (its jobs are dropped by forget_client)."""
        if writer.is_closing():
            return
        self.over_limit_log.warning("disconnecting a client: %s", why)
        with contextlib.suppress(Exception):
            writer.write(encode(Refused(message=f"disconnected: {why}")))
        writer.transport.abort()  # now: what it has not read is dropped with it

    def _check_hello(self, hello: ClientMessage | None, writer: asyncio.StreamWriter,
                     needs_token: bool) -> str | None:
        if not isinstance(hello, Hello):
            return "the first message must be hello"
        if hello.version != PROTOCOL_VERSION:
            return (f"protocol version {hello.version} is not served (this engine speaks "
                    f"{PROTOCOL_VERSION}); restart the older side")
        if needs_token and not self.token_ok(hello.token):
            return "missing or wrong token"
        uid = peer_uid(writer)
        if uid is not None and uid != os.getuid():
            return f"user {uid} may not use this engine"
        return None


async def read_message(reader: asyncio.StreamReader) -> ClientMessage | None:
    """The next message, or None at a clean end of stream."""
    try:
        header = await reader.readexactly(HEADER_BYTES)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    body = await reader.readexactly(frame_length(header))
    return decode_client(body)


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The connecting user's uid on a Linux Unix socket (defence in depth beside 0600)."""
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED") or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def load_for_service(model: str, device: str, quant: str):
    """The real engine, owned by this process (so it may set torch's thread count)."""
    from engine.engine import Engine

    engine = Engine.load(model, device=device, quant=quant)
    engine.use_cpu_threads()
    return engine


async def serve(options: ServeOptions, scheduler: ServiceHost | None = None) -> int:
    """Run until SIGTERM/SIGINT or idle exit. Returns the process exit code."""
    lock = None
    if options.lock is not None:
        paths.usable_dir(options.lock.parent)
        lock = paths.EngineLock(options.lock)
        if not lock.acquire():
            print(f"maskfill-engine: another engine already serves {options.socket}",
                  file=sys.stderr)
            return EXIT_ALREADY_RUNNING
    token = _token(options)
    tls = (server_context(options.tls_cert, options.tls_key)
           if options.tls_cert is not None and options.tls_key is not None else None)
    throttle_accept_errors(asyncio.get_running_loop())
    scheduler = scheduler or ServiceHost(
        lambda: load_for_service(options.model, options.device, options.quant),
        cache_size=options.cache_size, max_in_flight=options.max_in_flight)
    # Python 3.10 has no StreamWriter.start_tls: there the listener does the handshake,
    # before the connection's deadline starts (a TLS client then gets the limit twice).
    per_connection_tls = hasattr(asyncio.StreamWriter, "start_tls")
    service = EngineService(scheduler, token=token, idle_exit_s=options.idle_exit_s,
                            tcp_tls=tls if per_connection_tls else None,
                            hello_timeout_s=options.hello_timeout_s)
    closers: list = []
    endpoints: dict[str, Any] = {"pid": os.getpid()}
    if token is not None:  # where a client reads it (`maskfill-engine token` prints it too)
        endpoints["token_file"] = str(_token_file(options))
    try:
        if options.socket is not None:
            endpoints["socket"] = await _serve_unix(service, options.socket, closers)
        if options.tcp is not None:
            limit = connection_limit(options.tcp_max_connections, "TCP")
            listener_tls = {} if per_connection_tls or tls is None else {
                "ssl": tls, "ssl_handshake_timeout": options.hello_timeout_s}
            server = await asyncio.start_server(
                lambda r, w: service.tcp_connection(r, w, limit=limit), *options.tcp,
                backlog=ACCEPT_BACKLOG, **listener_tls)
            closers.append(server)
            host, port = server.sockets[0].getsockname()[:2]
            endpoints["tcp"] = f"{host}:{port}"
            # What an LSP's engineEndpoint names (tls://: checked against its certificate).
            bracketed = f"[{host}]" if ":" in host else host
            endpoints["tcp_url"] = f"{'tls' if tls is not None else 'tcp'}://{bracketed}:{port}"
        if options.http is not None:
            from engine.serve.http_api import start_http

            runner, url = await start_http(
                service, *options.http, max_body_bytes=options.max_body_bytes,
                read_timeout_s=options.http_read_timeout_s,
                max_connections=options.http_max_connections, tls=tls,
                allowed_hosts=options.http_allowed_hosts)
            closers.append(runner)
            endpoints["http"] = url
        if options.endpoint_file is not None:
            _write_private(options.endpoint_file, msgspec.json.encode(endpoints) + b"\n")
        print(msgspec.json.encode(endpoints).decode(), flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows
                loop.add_signal_handler(sig, service.stopped.set)
        idle = asyncio.ensure_future(service.watch_idle())
        await service.stopped.wait()
        idle.cancel()
        return 0 if scheduler.state != "failed" else 1
    finally:
        service.disconnect_all()
        for closer in reversed(closers):
            with contextlib.suppress(Exception):
                await _close(closer)
        await asyncio.get_running_loop().run_in_executor(None, scheduler.close)
        if options.socket is not None:
            with contextlib.suppress(OSError):
                options.socket.unlink()
        if options.endpoint_file is not None:
            with contextlib.suppress(OSError):
                options.endpoint_file.unlink()
        if lock is not None:
            lock.release()
        flush_all()  # the counts of throttled log lines not yet told


def _token(options: ServeOptions) -> str | None:
    remote = [a for a in (options.tcp, options.http) if a is not None]
    for host, _ in remote:
        if not is_loopback(host) and not options.allow_remote:
            raise EngineError(f"{host} is not a loopback address; pass --allow-remote to bind "
                              "it (clients will need the token)")
    if not remote:
        return None
    return paths.ensure_token(_token_file(options))


def _token_file(options: ServeOptions) -> Path:
    return options.token_file or paths.runtime_dir() / paths.TOKEN_FILE_NAME


async def _serve_unix(service: EngineService, path: Path, closers: list) -> str:
    paths.usable_dir(path.parent)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # we hold the lock: whatever is there is a dead engine's socket
    try:
        server = await asyncio.start_unix_server(
            lambda r, w: service.connection(r, w, needs_token=False), path=str(path))
    except OSError as exc:  # e.g. a path over the ~100-byte limit of Unix sockets
        raise EngineError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    os.chmod(path, 0o600)
    closers.append(server)
    return str(path)


async def _close(closer) -> None:
    if isinstance(closer, asyncio.AbstractServer):
        closer.close()
        await closer.wait_closed()
    else:
        await closer.cleanup()  # aiohttp AppRunner


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)

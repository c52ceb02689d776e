"""A blocking client of `maskfill-engine serve`, safe to use from several threads.

A reader thread routes each reply to the request that named its id, so a Cancel can be sent
while the Complete it stops is still waiting. `complete` has the signature of
Engine.complete: the caller's cancel Event is watched while the answer is awaited and turned
into a Cancel message, so newest-wins and $/cancelRequest reach the model across the socket.
Over TCP the session may be TLS (an engine serving `--tcp` with `--tls-cert`): `tcp(tls=...)`
checks the engine's certificate and name before the token is sent. One deadline
(SETUP_TIMEOUT_S) covers a connection's whole set-up: connect, TLS handshake and hello.
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import struct
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from engine.api import (
    CompletionRequest,
    CompletionResult,
    CompletionStats,
    EngineError,
    EngineUnavailable,
)
from engine.serve.protocol import (
    HEADER_BYTES,
    Cancel,
    Complete,
    FrameError,
    Hello,
    Prewarm,
    Refused,
    Result,
    StatusQuery,
    StatusReply,
    Welcome,
    decode_server,
    encode,
    frame_length,
)
from engine.serve.setup_deadline import DeadlineSocket, SetupDeadline, connect_tcp
from engine.serve.tls import EngineTlsError, TlsChannel, handshake_failure, looks_like_tls

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.005  # how soon a set cancel Event becomes a Cancel message
# Connect, TLS handshake and hello together: a silent endpoint holds a connect this long.
SETUP_TIMEOUT_S = 10.0
DEADLINE_SLACK_S = 30.0  # beyond the request's own deadline, before a silent engine is given up
# A stopped engine reads nothing: once the socket buffer is full a send would block for ever
# (holding the send lock); past this the connection is failed instead.
SEND_TIMEOUT_S = 5.0


class EngineGone(EngineError):
    """The connection to the engine closed (it exited, crashed or was killed)."""


class AnsweredInTls(FrameError):
    """A plain connection reached a TLS listener."""


class EngineSilent(EngineUnavailable):
    """The engine is connected but gave no answer past the request's deadline (stopped, hung
    or swamped): answer nothing now; the connection stays for the next request."""


def cancelled_result() -> CompletionResult:
    return CompletionResult(text="", candidates=[], stats=CompletionStats(cancelled=True))


def _bound_sends(sock: socket.socket, seconds: float) -> None:
    """SO_SNDTIMEO: a blocking send gives up after `seconds` (receives still wait: the reader
    thread blocks on recv by design). Left unset where the platform refuses it."""
    try:
        whole = int(seconds)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", whole, int((seconds - whole) * 1e6)))
    except (OSError, struct.error, AttributeError):
        pass


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = sock.recv(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(sock: socket.socket | TlsChannel):
    header = _recv_exactly(sock, HEADER_BYTES)
    if header is None:
        return None
    if looks_like_tls(header):  # a TLS server's alert to a plain client
        raise AnsweredInTls("the engine answered in TLS (it serves --tcp with --tls-cert): "
                            "connect with tls://HOST:PORT")
    body = _recv_exactly(sock, frame_length(header))
    if body is None:
        return None
    return decode_server(body)


class EngineConnection:
    def __init__(self, sock: socket.socket | TlsChannel | DeadlineSocket, *, name: str = "",
                 token: str | None = None, setup: DeadlineSocket | None = None):
        """Say hello over `sock` (a connected socket, or a TlsChannel over one). `setup`: the
        DeadlineSocket under `sock` whose deadline the stages before already used; None (a
        socket connected elsewhere): the hello alone gets SETUP_TIMEOUT_S."""
        if setup is None:
            sock = setup = DeadlineSocket(sock, SetupDeadline(SETUP_TIMEOUT_S))
        self._sock = sock
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, Future] = {}
        self._pending_lock = threading.Lock()
        self.lost: str | None = None
        deadline = setup.deadline
        assert deadline is not None, "set-up released before the hello"
        deadline.stage = "waiting for its Welcome to our hello"
        try:
            sock.sendall(encode(Hello(client=name, token=token)))
            first = _read_frame(sock)
        except AnsweredInTls as exc:
            sock.close()
            raise EngineTlsError(str(exc)) from None
        except TimeoutError:  # before OSError: a timeout is one
            sock.close()
            raise deadline.expired() from None
        except (OSError, FrameError) as exc:
            sock.close()
            raise EngineGone(f"the engine did not answer hello: {exc}") from None
        if isinstance(first, Refused):
            sock.close()
            raise EngineError(f"the engine refused the connection: {first.message}")
        if not isinstance(first, Welcome):
            sock.close()
            raise EngineGone("the engine closed the connection during hello")
        self.welcome = first
        setup.release()
        _bound_sends(sock, SEND_TIMEOUT_S)
        self._reader = threading.Thread(target=self._read, name="maskfill-engine-reader",
                                        daemon=True)
        self._reader.start()

    @classmethod
    def unix(cls, path: Path | str, *, name: str = "") -> EngineConnection:
        """Over a unix socket; connect and hello within SETUP_TIMEOUT_S (EngineSetupTimeout
        past it, OSError when nothing listens there)."""
        deadline = SetupDeadline(SETUP_TIMEOUT_S, f"unix:{path}")
        sock = DeadlineSocket(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), deadline)
        try:
            sock.connect(str(path))
        except TimeoutError:  # the deadline ended the connect (on Linux a full backlog is
            # BlockingIOError at once, an OSError like nothing listening)
            sock.close()
            raise deadline.expired() from None
        except OSError:
            sock.close()
            raise
        return cls(sock, name=name, setup=sock)

    @classmethod
    def tcp(cls, host: str, port: int, *, token: str, name: str = "",
            tls: ssl.SSLContext | None = None,
            setup_s: float | None = None) -> EngineConnection:
        """Over TCP; with `tls`, a TLS session whose certificate and host name are checked
        before the token is sent (EngineTlsError when they are not good). Connect, handshake
        and hello share one deadline, `setup_s` (default SETUP_TIMEOUT_S): EngineSetupTimeout
        past it, whichever stage the endpoint went silent in."""
        where = f"{'tls' if tls is not None else 'tcp'}://{host}:{port}"
        deadline = SetupDeadline(SETUP_TIMEOUT_S if setup_s is None else setup_s, where)
        try:
            sock = connect_tcp(host, port, deadline)
        except TimeoutError:
            raise deadline.expired() from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is None:
            return cls(sock, name=name, token=token, setup=sock)
        deadline.stage = "shaking hands (TLS)"
        channel = TlsChannel(sock, tls, server_hostname=host)
        try:
            channel.handshake()
        except TimeoutError:  # before OSError: silence is not a failed handshake
            sock.close()
            raise deadline.expired() from None
        except (OSError, ssl.SSLError) as exc:  # resets included
            sock.close()
            raise handshake_failure(exc, where, channel.first_answer) from None
        return cls(channel, name=name, token=token, setup=sock)

    @property
    def alive(self) -> bool:
        return self.lost is None

    def complete(self, request: CompletionRequest, cancel: threading.Event | None = None,
                 *, key: str = "", slack_s: float = DEADLINE_SLACK_S,
                 cancel_wait_s: float | None = None) -> CompletionResult:
        """Engine.complete across the socket; a dropped or stopped job answers cancelled.

        An engine silent `slack_s` past the request's deadline raises EngineSilent. Once
        cancelled, the engine's acknowledgement is awaited at most `cancel_wait_s` (None: up to
        the deadline): a stopped (SIGSTOP) engine must not hold the caller's newer request."""
        job_id, future = self._open()
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        self._send(Complete(id=job_id, request=request, key=key))
        limit = (request.timeout_ms or 0) / 1000 + slack_s
        deadline = time.monotonic() + limit
        cancel_sent_at: float | None = None
        while not done.wait(CANCEL_POLL_S if cancel is not None and cancel_sent_at is None
                            else 0.05):
            now = time.monotonic()
            if cancel is not None and cancel.is_set() and cancel_sent_at is None:
                self._send(Cancel(id=job_id))
                cancel_sent_at = now
            if (cancel_sent_at is not None and cancel_wait_s is not None
                    and now - cancel_sent_at > cancel_wait_s):
                self._forget(job_id)  # a late answer is dropped by the reader
                return cancelled_result()
            if now > deadline:
                self._send(Cancel(id=job_id))
                self._forget(job_id)
                raise EngineSilent(f"the engine (pid {self.welcome.pid}) gave no answer "
                                   f"within {limit:.1f} s")
        reply: Result = future.result()  # raises EngineGone when the connection was lost
        if reply.error is not None:
            raise EngineError(reply.error)
        return reply.result if reply.result is not None else cancelled_result()

    @property
    def can_prewarm(self) -> bool:
        """Whether the engine said it serves Prewarm (an older one drops the connection)."""
        return "prewarm" in self.welcome.capabilities

    def prewarm(self, request: CompletionRequest) -> bool:
        """Ask the engine to encode `request`'s context when idle; no reply is awaited.
        False (nothing sent) when the engine does not serve it; EngineGone when lost."""
        if not self.can_prewarm:
            return False
        if self.lost is not None:
            raise EngineGone(f"the engine connection is closed ({self.lost})")
        self._send(Prewarm(request=request))
        return True

    def status(self, timeout: float = 10.0) -> StatusReply:
        job_id, future = self._open()
        self._send(StatusQuery(id=job_id))
        try:
            return future.result(timeout)
        except FutureTimeout:
            self._forget(job_id)
            raise EngineError(f"the engine did not answer status within {timeout:.0f} s") from None

    def close(self) -> None:
        self._fail_all("closed by this client")
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    # -- internals -------------------------------------------------------------------------

    def _open(self) -> tuple[int, Future]:
        if self.lost is not None:
            raise EngineGone(f"the engine connection is closed ({self.lost})")
        job_id, future = next(self._ids), Future()
        with self._pending_lock:
            self._pending[job_id] = future
        return job_id, future

    def _forget(self, job_id: int) -> None:
        with self._pending_lock:
            self._pending.pop(job_id, None)

    def _send(self, message) -> None:
        try:
            with self._send_lock:
                self._sock.sendall(encode(message))
        except OSError as exc:
            self._fail_all(f"send failed: {exc}")
            raise EngineGone(f"the engine connection broke: {exc}") from None

    def _read(self) -> None:
        reason = "the engine closed the connection"
        try:
            while (message := _read_frame(self._sock)) is not None:
                if isinstance(message, Refused):
                    reason = f"the engine closed the connection: {message.message}"
                    break
                if isinstance(message, (Result, StatusReply)):
                    with self._pending_lock:
                        future = self._pending.pop(message.id, None)
                    if future is not None and not future.done():
                        future.set_result(message)
        except (OSError, FrameError) as exc:
            reason = f"the engine connection broke: {exc}"
        self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(EngineGone(reason))

"""One deadline for setting up a connection to an engine: connect, TLS handshake and hello.

Each blocking call on the socket waits only what the calls before it left, so an endpoint
that accepts and never speaks TLS, never sends its Welcome, or trickles its answer a byte at a
time holds the caller no longer than the one limit, whichever stage it stalls in (each stage
with its own limit held it up to three limits, and a trickle for ever). Torch-free.
"""

from __future__ import annotations

import socket
import time

from engine.api import EngineUnavailable
from engine.serve.wrapped_socket import WrappedSocket

# The engine's side of the same set-up: seconds a client has from being accepted to say hello
# (on Python 3.11+ a --tcp TLS handshake included; engine/serve/server.py), the default of
# --hello-timeout-s. Here, not in protocol.py, so `maskfill-engine --help` needs no msgspec
# (the GPU image has none: tests/engine/test_gpu_entry_points.py).
HELLO_TIMEOUT_S = 10.0


class EngineSetupTimeout(EngineUnavailable):
    """The engine's endpoint gave no answer within the set-up deadline (stopped, hung, not an
    engine, or a firewall dropping packets): a request answers nothing and is not tried
    again, since a silent endpoint stays silent at any span."""


class SetupDeadline:
    """The limit shared by a connection's set-up stages, and the stage it is in (`stage` is
    said in the error: "connecting", "shaking hands (TLS)", ...)."""

    def __init__(self, seconds: float, where: str = ""):
        self.seconds = seconds
        self.where = where  # the endpoint, as the user wrote it (tls://HOST:PORT)
        self.stage = "connecting"
        self._at = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left; TimeoutError when none are (a socket timeout reads the same)."""
        left = self._at - time.monotonic()
        if left <= 0:
            raise TimeoutError("the set-up deadline has passed")
        return left

    def expired(self) -> EngineSetupTimeout:
        where = f" at {self.where}" if self.where else ""
        return EngineSetupTimeout(f"the engine{where} gave no answer within "
                                  f"{self.seconds:.1f} s while {self.stage}")


class DeadlineSocket(WrappedSocket):
    """A socket whose blocking calls wait only what `deadline` has left, until `release()`;
    from then on they block as the socket is set (the connection's reader waits for ever).

    It has the few socket methods the engine client and TlsChannel use. Set-up runs on one
    thread and release() comes before the reader starts, so the timeout is never changed
    under another thread's call."""

    def __init__(self, sock: socket.socket, deadline: SetupDeadline):
        self._sock = sock
        self.deadline: SetupDeadline | None = deadline

    def _arm(self) -> None:
        if self.deadline is not None:
            self._sock.settimeout(self.deadline.left())

    def connect(self, address) -> None:
        self._arm()
        self._sock.connect(address)

    def recv(self, n: int) -> bytes:
        self._arm()
        return self._sock.recv(n)

    def sendall(self, data: bytes) -> None:
        self._arm()  # sendall's timeout bounds the whole call, not each chunk
        self._sock.sendall(data)

    def release(self) -> None:
        """Set-up is over: no deadline, blocking calls."""
        self.deadline = None
        self._sock.settimeout(None)


def connect_tcp(host: str, port: int, deadline: SetupDeadline) -> DeadlineSocket:
    """socket.create_connection under the one deadline: each address tried gets what the
    ones before it left (create_connection gives each its full timeout). The name lookup
    itself is not bounded (as before). TimeoutError when the deadline passes."""
    error: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port,
                                                              type=socket.SOCK_STREAM):
        sock = DeadlineSocket(socket.socket(family, kind, proto), deadline)
        try:
            sock.connect(address)
            return sock
        except OSError as exc:  # refused, unreachable, timed out: try the next address
            sock.close()
            error = exc
    raise error or OSError(f"no address for {host}")

"""The socket calls a wrapper of a socket passes straight through (the set-up deadline's
DeadlineSocket and the TLS channel wrap one; the engine client calls these on either)."""

from __future__ import annotations

import socket


class WrappedSocket:
    """Pass-through of settimeout, setsockopt, shutdown and close to `self._sock`."""

    _sock: socket.socket

    def settimeout(self, seconds: float | None) -> None:
        self._sock.settimeout(seconds)

    def setsockopt(self, *args) -> None:
        self._sock.setsockopt(*args)

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()

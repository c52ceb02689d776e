"""Log lines that a stranger can trigger, throttled: the first few of each kind per period are
logged, the rest are counted and summed up in one line when the period ends (or the process
stops), so 500 refused connections make 6 lines, not 500 (issue 20.10)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref

FIRST = 5  # lines logged as they come, per period
PERIOD_S = 60.0

_all: weakref.WeakSet[ThrottledLog] = weakref.WeakSet()


class ThrottledLog:
    def __init__(self, logger: logging.Logger, what: str, *, first: int = FIRST,
                 period_s: float = PERIOD_S):
        self.logger, self.what, self.first, self.period_s = logger, what, first, period_s
        self._started = 0.0
        self._shown = 0
        self._held = 0
        self._timer: asyncio.TimerHandle | None = None
        _all.add(self)

    def warning(self, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._started >= self.period_s:
            self.flush()
            self._started = now
        if self._shown < self.first:
            self._shown += 1
            self.logger.warning(message, *args)
            return
        self._held += 1
        if self._timer is None:  # the count is told even if the flood stops now
            with contextlib.suppress(RuntimeError):  # no loop running: told at flush_all()
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self._started + self.period_s - now, self.flush)

    def flush(self) -> None:
        """Log the count of lines held back, and start a new period."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._held:
            self.logger.warning("%d more %s in the last %.1f s (the first %d of each %.0f s "
                                "are logged)", self._held, self.what,
                                time.monotonic() - self._started, self.first, self.period_s)
        self._held = self._shown = 0
        self._started = time.monotonic()


def flush_all() -> None:
    """At exit: every count not yet told."""
    for throttled in list(_all):
        throttled.flush()


def throttle_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs an error with a traceback for every failed accept() when descriptors run
    out, and a flood makes that hundreds a second (enough to fill a stderr pipe and stall the
    loop): those go through a ThrottledLog, everything else to the default handler."""
    throttled = ThrottledLog(logging.getLogger("asyncio"), "failed accept() calls")

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if context.get("message", "").startswith("socket.accept() out of system resource"):
            exc = context.get("exception")
            throttled.warning("accept() failed: %s (out of file descriptors; raise `ulimit -n`)",
                              exc)
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handle)

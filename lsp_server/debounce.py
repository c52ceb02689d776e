"""Request scheduling on the asyncio side: newest wins per document, adaptive debounce.

Neovim and LSP4IJ never cancel a superseded inline-completion request (editors.md §2), so
the server does: a new request for a document supersedes the one before it, which then
answers with an empty list instead of occupying the model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.serve.host import Job
from engine.serve.newest_wins import NewestWins


@dataclass
class DocumentRequest:
    """One in-flight request for a document."""

    uri: str
    superseded: asyncio.Event = field(default_factory=asyncio.Event)
    job: Job | None = None

    def supersede(self) -> None:
        self.superseded.set()
        if self.job is not None:
            self.job.cancel.set()

    async def wait_superseded_or(self, event: asyncio.Event, seconds: float) -> bool:
        """Sleep until `event` is set, up to `seconds`; True when a newer request replaced
        this one instead."""
        waiters = [asyncio.ensure_future(self.superseded.wait()),
                   asyncio.ensure_future(event.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return self.superseded.is_set()

    async def wait_superseded(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True as soon as a newer request replaced this one."""
        if seconds <= 0:
            return self.superseded.is_set()
        try:
            await asyncio.wait_for(self.superseded.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            return False
        return True


class LatestPerDocument:
    """The newest request per document uri, by the one newest-wins rule
    (engine/serve/newest_wins.py); on the event loop only."""

    def __init__(self) -> None:
        self._newest: NewestWins[DocumentRequest] = NewestWins(DocumentRequest.supersede)

    @property
    def superseded(self) -> int:
        return self._newest.superseded

    def begin(self, uri: str) -> DocumentRequest:
        ticket = DocumentRequest(uri=uri)
        self._newest.begin(uri, ticket)
        return ticket

    def end(self, ticket: DocumentRequest) -> None:
        self._newest.end(ticket.uri, ticket)

    def is_latest(self, ticket: DocumentRequest) -> bool:
        return self._newest.is_latest(ticket.uri, ticket)


class AdaptiveDebounce:
    """How long an Automatic request waits before it may reach the model.

    While the user types faster than `max_ms` per key, waiting a little longer than their
    typical gap between keystrokes lets the next keystroke supersede this request for free.
    When they type slower than that, waiting saves nothing, so only `min_ms` is waited.
    Gaps longer than PAUSE_S are pauses, not typing, and reset the estimate.
    """

    PAUSE_S = 2.0
    SMOOTHING = 0.3  # weight of the newest gap in the moving average
    MARGIN = 1.25  # wait a bit longer than the typical gap

    def __init__(
        self, min_ms: float, max_ms: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.min_ms = min(min_ms, max_ms)
        self.max_ms = max(min_ms, max_ms)
        self._clock = clock
        self._last_arrival: dict[str, float] = {}
        self._typical_gap_ms: dict[str, float] = {}

    def delay_ms(self, uri: str) -> float:
        """Record a request's arrival for `uri` and return how long it should wait."""
        now = self._clock()
        last = self._last_arrival.get(uri)
        self._last_arrival[uri] = now
        if last is not None:
            gap_ms = (now - last) * 1000
            if gap_ms > self.PAUSE_S * 1000:
                self._typical_gap_ms.pop(uri, None)
            else:
                previous = self._typical_gap_ms.get(uri, gap_ms)
                self._typical_gap_ms[uri] = (
                    self.SMOOTHING * gap_ms + (1 - self.SMOOTHING) * previous
                )
        typical = self._typical_gap_ms.get(uri)
        if typical is None:
            return self.min_ms
        wanted = typical * self.MARGIN
        return max(self.min_ms, wanted) if wanted <= self.max_ms else self.min_ms

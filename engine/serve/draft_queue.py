"""Drafts from the engine's draft thread to the asyncio task that streams them, in order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from engine.api import Draft


class DraftQueue:
    """`put` is the engine's `on_draft` (called on its draft thread); `until` yields each draft
    as it comes while the run is going, then the ones still queued: every draft is queued
    before the run's answer, so none is lost or comes after it."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Draft] = asyncio.Queue()

    def put(self, draft: Draft) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, draft)

    async def until(self, run: asyncio.Future) -> AsyncIterator[Draft]:
        while True:
            getter = asyncio.ensure_future(self._queue.get())
            await asyncio.wait({run, getter}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            yield getter.result()
        while not self._queue.empty():
            yield self._queue.get_nowait()

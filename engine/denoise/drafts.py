"""Streamed drafts: successive partial fills of one hole row while it is being denoised.

The denoising loop hands each host read it makes anyway to `DraftFeed.offer` on the model's
thread, which only queues the row's tokens (no device access, no decoding there). A small thread
of the feed's own decodes the newest of them into an api.Draft and calls the caller's
`on_draft`; reads that pile up while it decodes are skipped (the newest holds what they held),
and a read that changed nothing is not repeated. `close` waits until every queued read is
delivered, so all drafts reach the caller before the final answer does.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from engine.api import DRAFT_MASK, CompletionRequest, Draft
from engine.stop import apply_stop

log = logging.getLogger(__name__)
CLOSE_WAIT_S = 30.0


class DraftFeed:
    def __init__(self, row: int, length: int, request: CompletionRequest, *, tokenizer,
                 mask_id: int, end_ids: set[int], on_draft: Callable[[Draft], None]):
        self.row, self.length, self.request = row, length, request
        self._tokenizer, self._mask_id, self._end_ids = tokenizer, mask_id, end_ids
        self._on_draft = on_draft
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._last: list[int] | None = None
        self._thread = threading.Thread(target=self._main, name="maskfill-drafts", daemon=True)
        self._thread.start()

    def offer(self, step: int, tokens: list[list[int]], _open: list[list[bool]]) -> None:
        """The loop's read (model thread): one queue put."""
        self._queue.put((step, tokens[self.row][: self.length]))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(CLOSE_WAIT_S)

    def _main(self) -> None:
        while True:
            item, closing = self._queue.get(), False
            while item is not None:  # skip to the newest read queued meanwhile
                try:
                    newer = self._queue.get_nowait()
                except queue.Empty:
                    break
                if newer is None:
                    closing = True
                    break
                item = newer
            if item is not None and item[1] != self._last:
                self._last = item[1]
                try:
                    self._on_draft(self.draft(*item))
                except Exception:  # noqa: BLE001 - a broken reader must not stop the feed
                    log.exception("delivering a draft failed")
            if item is None or closing:
                return

    def draft(self, step: int, tokens: list[int]) -> Draft:
        mask, ends = self._mask_id, self._end_ids
        end = next((i for i, t in enumerate(tokens) if t in ends), len(tokens))
        row = tokens[:end]
        first_mask = row.index(mask) if mask in row else len(row)
        text = self._decode(row[:first_mask])
        broken = text.find("\ufffd")  # a character still split across a masked slot
        if broken >= 0 and "\ufffd" not in self.request.prefix + self.request.suffix:
            text = text[:broken]
        text = apply_stop(text, self.request.stop, self.request.prefix)
        parts, run = [], []
        for token in row:
            if token == mask:
                if run:
                    parts.append(self._decode(run))
                    run = []
                parts.append(DRAFT_MASK)
            else:
                run.append(token)
        if run:
            parts.append(self._decode(run))
        return Draft(step=step, text=text, fill="".join(parts),
                     masked=sum(1 for t in tokens if t == mask), slots=len(tokens))

    def _decode(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens) if tokens else ""

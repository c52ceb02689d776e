"""From a document snapshot to suggestions: caches, debounce, the model, post-processing.

Everything reads the Snapshot taken before the handler's first await. Cheap answers come
first (typed-through reuse, the exact-context cache); only then does a request wait out the
debounce and queue for the model, and a newer request for the same document supersedes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from lsprotocol import types
from pygls.workspace import TextDocument

from engine.api import CompletionRequest, CompletionResult
from lsp_server.cache import ExactCache, TypedThrough
from lsp_server.documents import Snapshot, context_window, detect_indent, looks_binary
from lsp_server.postprocess import CursorContext, choose_stop, postprocess
from lsp_server.protocol import Suggestion, cover_auto_closed, shift
from lsp_server.scheduler import AdaptiveDebounce, LatestPerDocument
from lsp_server.settings import Settings
from lsp_server.worker import EngineWorker

log = logging.getLogger(__name__)

NEXT_LINES = 5  # lines below the cursor the suffix-duplicate rule looks at


@dataclass(frozen=True)
class Selection:
    """The completion popup's selected item (InlineCompletionContext.selectedCompletionInfo):
    [start, end) offsets in the snapshot's text, the item's text, and the client range start."""

    start: int
    end: int
    text: str
    client_start: types.Position


@dataclass(frozen=True)
class Prepared:
    """What one request will ask the model, derived from the snapshot alone."""

    prefix: str
    suffix: str
    cursor: CursorContext
    stop: str
    candidates: int

    @property
    def cache_key(self) -> tuple:
        return (self.prefix, self.suffix, self.stop, self.candidates)


class CompletionService:
    """The completion pipeline shared by inlineCompletion and the completion fallback."""

    def __init__(self, worker: EngineWorker, settings: Callable[[], Settings]):
        self.worker = worker
        self._settings = settings
        self.latest = LatestPerDocument()
        self.typed = TypedThrough()
        s = settings()
        self.cache = ExactCache(s.cache_size)
        self.debounce = AdaptiveDebounce(s.debounce_min_ms, s.debounce_max_ms)
        self.requests = 0
        self.model_answers = 0

    def settings_changed(self, reloaded: bool) -> None:
        s = self._settings()
        self.debounce = AdaptiveDebounce(s.debounce_min_ms, s.debounce_max_ms)
        self.cache = ExactCache(s.cache_size)  # knobs or the model changed: old answers are stale
        if reloaded:
            self.typed = TypedThrough()

    def prepare(
        self, snap: Snapshot, *, invoked: bool, selection: Selection | None
    ) -> Prepared | None:
        """Build the model's context; None when this document should not be completed."""
        s = self._settings()
        if not s.enabled or not s.serves(snap.language_id):
            return None
        text, offset = snap.text, snap.offset
        if selection is not None:  # complete as if the selected popup item were already typed
            text = text[: selection.start] + selection.text + text[max(selection.end, offset) :]
            offset = selection.start + len(selection.text)
        window = context_window(
            text,
            offset,
            lines_before=s.context_lines_before,
            lines_after=s.context_lines_after,
            budget_tokens=s.context_tokens,
        )
        if looks_binary(window.prefix[-2000:] + window.suffix[:2000]):
            return None
        cursor = _cursor_context(window.prefix, window.suffix, snap.eol)
        return Prepared(
            prefix=window.prefix,
            suffix=window.suffix,
            cursor=cursor,
            stop=choose_stop(cursor, s.stop_mode),
            candidates=s.num_candidates if invoked else 1,
        )

    async def suggest(
        self,
        snap: Snapshot,
        document: TextDocument,
        *,
        invoked: bool,
        selection: Selection | None = None,
    ) -> list[Suggestion]:
        """Suggestions for `snap`; [] when superseded, cancelled, loading or nothing fits."""
        self.requests += 1
        prepared = self.prepare(snap, invoked=invoked, selection=selection)
        if prepared is None:
            return []
        if selection is None:
            reused = self.typed.reuse(snap.uri, snap.text, snap.offset)
            if reused is not None:
                return self._suggestions(reused, snap, prepared, selection)
        cached = self.cache.get(prepared.cache_key)
        if cached is not None:
            self._remember(snap, selection, cached)
            return self._suggestions(cached, snap, prepared, selection)
        if not self.worker.ready:
            return []  # loading (or failed): answer at once, never queue behind a load

        ticket = self.latest.begin(snap.uri)
        try:
            if not invoked and await ticket.wait_superseded(
                self.debounce.delay_ms(snap.uri) / 1000
            ):
                return []
            ticket.job = self.worker.submit(snap.uri, self._request(prepared))
            try:
                result = await asyncio.wrap_future(ticket.job.future)
            except asyncio.CancelledError:  # $/cancelRequest: stop the model between steps
                ticket.job.cancel.set()
                raise
        finally:
            self.latest.end(ticket)
        if result is None or result.stats.cancelled or ticket.superseded.is_set():
            return []
        self.model_answers += 1
        texts = self._finish(result, prepared)
        if not result.stats.timed_out:
            self.cache.put(prepared.cache_key, texts)
        self._remember(snap, selection, texts)
        if document.version != snap.version or document.source is not snap.text:
            return self._late(texts, snap, document, prepared, selection)
        return self._suggestions(texts, snap, prepared, selection)

    def _request(self, prepared: Prepared) -> CompletionRequest:
        s = self._settings()
        return CompletionRequest(
            prefix=prepared.prefix,
            suffix=prepared.suffix,
            max_tokens=s.max_tokens,
            stop=prepared.stop,  # type: ignore[arg-type]
            num_candidates=prepared.candidates,
            temperature=0.0 if prepared.candidates == 1 else 0.8,
            max_context_tokens=s.context_tokens,
            timeout_ms=s.timeout_ms,
        )

    def _finish(self, result: CompletionResult, prepared: Prepared) -> tuple[str, ...]:
        """Post-process every candidate; keep the distinct survivors, best first."""
        raw = [c.text for c in result.candidates] or [result.text]
        texts: list[str] = []
        for candidate in raw:
            text = postprocess(candidate, prepared.cursor, prepared.stop)  # type: ignore[arg-type]
            if text is not None and text not in texts:
                texts.append(text)
        return tuple(texts[: prepared.candidates])

    def _remember(self, snap: Snapshot, selection: Selection | None, texts: tuple[str, ...]):
        if selection is None:
            self.typed.remember(snap.uri, snap.text, snap.offset, texts)

    def _suggestions(
        self,
        texts: tuple[str, ...],
        snap: Snapshot,
        prepared: Prepared,
        selection: Selection | None,
    ) -> list[Suggestion]:
        """Items replacing from the cursor (or the selection's start) over auto-closed chars."""
        out = []
        for text in texts:
            insert, replaced = cover_auto_closed(text, prepared.cursor.line_after)
            if selection is not None:
                start = selection.client_start
                insert = selection.text + insert
            else:
                start = snap.position
            out.append(
                Suggestion(
                    text=insert,
                    start=start,
                    end=shift(snap.position, replaced, snap.codec),
                )
            )
        return out

    def _late(
        self,
        texts: tuple[str, ...],
        snap: Snapshot,
        document: TextDocument,
        prepared: Prepared,
        selection: Selection | None,
    ) -> list[Suggestion]:
        """The document changed while the model ran. If the user only typed the head of the
        suggestion at the cursor, answer with items that replace what they typed (valid in
        the document as it is now); otherwise answer nothing rather than a stale suggestion."""
        if selection is not None:
            return []
        text, offset = document.source, snap.offset
        typed_length = len(text) - len(snap.text)
        if not 0 < typed_length <= TypedThrough.MAX_TYPED:
            return []
        typed = text[offset : offset + typed_length]
        context = TypedThrough.CONTEXT_CHARS
        unchanged = (
            text[max(0, offset - context) : offset] == snap.text[max(0, offset - context) : offset]
            and text[offset + typed_length : offset + typed_length + context]
            == snap.text[offset : offset + context]
        )
        if not unchanged or "\n" in typed or "\r" in typed:
            return []
        out = []
        for suggestion in self._suggestions(texts, snap, prepared, None):
            if suggestion.text.startswith(typed) and len(suggestion.text) > typed_length:
                replaced = snap.codec.client_num_units(typed) + (
                    suggestion.end.character - snap.position.character
                )
                end = types.Position(
                    line=snap.position.line, character=snap.position.character + replaced
                )
                out.append(Suggestion(text=suggestion.text, start=suggestion.start, end=end))
        return out


def _cursor_context(prefix: str, suffix: str, eol: str) -> CursorContext:
    before_lines = prefix.split("\n")
    after_lines = suffix.split("\n")
    previous = next((line for line in reversed(before_lines[:-1]) if line.strip()), "")
    sample = prefix[-4000:] + suffix[:2000]
    return CursorContext(
        line_before=before_lines[-1],
        line_after=after_lines[0],
        next_lines=after_lines[1 : 1 + NEXT_LINES],
        previous_line=previous,
        indent_unit=detect_indent(sample),
        eol=eol,
    )

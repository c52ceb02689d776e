"""From a document snapshot to suggestions: caches, debounce, the model, post-processing.

Everything reads the Snapshot taken before the handler's first await. Cheap answers come
first (typed-through reuse, the exact-context cache); only then does a request wait out the
debounce and queue for the model, and a newer request for the same document supersedes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import re
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from lsprotocol import types
from pygls.workspace import TextDocument

from engine.api import Candidate, CompletionRequest, CompletionResult, ContextChunk, StopMode
from engine.serve.exact_cache import ExactCache
from lsp_server import request_timing
from lsp_server.cache import TypedThrough, inserted_at
from lsp_server.context import ContextBlock, StableContext, extra_context_tokens
from lsp_server.debounce import AdaptiveDebounce, DocumentRequest, LatestPerDocument
from lsp_server.documents import Snapshot, context_window, detect_indent, looks_binary
from lsp_server.engine_host import CALL_MS, LspEngineHost
from lsp_server.postprocess import CursorContext, choose_stop, is_useless, postprocess
from lsp_server.protocol import Suggestion, cover_auto_closed, shift
from lsp_server.settings import Settings
from lsp_server.syntax.pick import Picked, SyntaxView, hole_check, pick, view_at
from lsp_server.syntax.rank import Row

log = logging.getLogger(__name__)

HOLE_ROWS = (8, 16, 32, 64)  # the engine's hole-length rows (engine.denoise.buckets.SPAN_GUESSES)
NEXT_LINES = 5  # lines below the cursor the suffix-duplicate rule looks at
INDENT_SAMPLE_CHARS = 8000  # each side of the cursor
LOADING_STATES = ("unloaded", "loading")  # a request arriving now waits for the model
# A lone surrogate (a JSON "\ud800" from a client) has no UTF-8 form: no tokenizer takes it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Builds each request's hole check while the model runs (the rows' cut waits for it).
_SYNTAX_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="maskfill-syntax")
# The longest the thread that answers a job waits for its hole check after the model (a check
# is a parse, ~1 ms at 2k lines): one never built (the pool shut down at interpreter exit)
# must not hold that thread for good, nor, with a one-call engine, the whole engine host.
SYNTAX_CHECK_WAIT_S = 5.0


@dataclass(frozen=True)
class Selection:
    """The completion popup's selected item (InlineCompletionContext.selectedCompletionInfo):
    [start, end) offsets in the snapshot's text, the item's text, and the client range start."""

    start: int
    end: int
    text: str
    client_start: types.Position


@dataclass(frozen=True)
class Finished:
    """The texts of one model answer, post-processed and cut (`_cut`), best first; and the
    syntax pick's verdict, which the status counts (`_count`)."""

    texts: tuple[str, ...]
    picked: Picked | None = None


@dataclass(frozen=True)
class Prepared:
    """What one request will ask the model, derived from the snapshot alone."""

    prefix: str
    suffix: str
    cursor: CursorContext
    stop: StopMode
    candidates: int
    knobs: tuple  # every other setting that changes the model's answer
    syntax: SyntaxView | None = None  # the document's tree at the snapshot (issue 23)
    extra: tuple[ContextChunk, ...] = ()  # other files' code (the stable context block)
    extra_tokens: int = 0  # its estimated tokens: the window grows by as much

    @property
    def cache_key(self) -> tuple:
        # With syntax the answer also depends on the file beyond the model's window (the
        # cut parses the whole file): its length stands for it, cheaply.
        shape = None if self.syntax is None else (len(self.syntax.before), len(self.syntax.after))
        return (self.prefix, self.suffix, self.stop, self.candidates, self.knobs, shape,
                self.extra)

    @property
    def seed(self) -> int:
        """The sampling seed of the extra (manual-trigger) candidates, taken from the context:
        the same code and cursor get the same candidates in every session, as the exact cache
        already gives them within one; a different context gets different draws."""
        digest = hashlib.blake2b(digest_size=8)
        for part in (self.prefix, "\0", self.suffix, "\0", self.stop):
            digest.update(part.encode("utf-8", "surrogatepass"))
        return int.from_bytes(digest.digest(), "little") >> 2  # 62 bits, as the engine draws


class CompletionService:
    """The completion pipeline shared by inlineCompletion and the completion fallback."""

    def __init__(
        self,
        worker: LspEngineHost,
        settings: Callable[[], Settings],
        on_held: Callable[[], None] = lambda: None,
    ):
        self.worker = worker
        self._settings = settings
        self._on_held = on_held  # the server re-sends its status: "loading, N waiting"
        self.latest = LatestPerDocument()
        self.typed = TypedThrough()
        s = settings()
        self.cache = ExactCache(s.cache_size)
        self.debounce = AdaptiveDebounce(s.debounce_min_ms, s.debounce_max_ms)
        self.requests = 0
        self.model_answers = 0
        # Syntax on the completion path: answers the cut judged, rows hidden because no cut of
        # them parses, answers left empty for that reason, and the last cursor kind.
        self.syntax_judged = 0
        self.syntax_hidden_rows = 0
        self.syntax_emptied = 0
        self.last_cursor_kind: str | None = None
        # The context gatherer (set by the server once it knows the workspace folders) and
        # the block the last request carried, as `--explain-context` prints it.
        self.context: StableContext | None = None
        self.last_context: ContextBlock | None = None
        self.model_window: int | None = None  # the loaded model's window, for the budget
        # The last request's cursor, to re-gather there when an open/close/save changes the
        # workspace while the user idles (refresh_context), and whether its block changed.
        self._last_cursor: tuple[Snapshot, TextDocument | None] | None = None
        self._block_changed = False
        self.held = 0  # requests waiting for the model to load
        self.max_tokens_limit: int | None = None  # from the loaded model's window
        self._model_changed = asyncio.Event()  # set (and replaced) when the load state moves
        # Bumped on every settings change: an answer computed under older settings is dropped.
        self.generation = 0

    def settings_changed(self, reloaded: bool) -> None:
        self.generation += 1
        s = self._settings()
        self.debounce = AdaptiveDebounce(s.debounce_min_ms, s.debounce_max_ms)
        self.cache = ExactCache(s.cache_size)  # knobs or the model changed: old answers are stale
        if reloaded:
            self.typed = TypedThrough()

    def model_state_changed(self) -> None:
        """Wake the requests held for the model: each looks at the worker's state again."""
        self._model_changed.set()
        self._model_changed = asyncio.Event()

    async def _model_ready(self, ticket: DocumentRequest) -> bool:
        """Hold a request that arrives while the model loads (an empty answer would leave
        the editor with nothing until the next keystroke), up to timeoutMs; True once the
        model is ready, False if it failed, time ran out or a newer request replaced it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings().timeout_ms / 1000
        self.held += 1
        self._on_held()
        try:
            while self.worker.state in LOADING_STATES:
                remaining = deadline - loop.time()
                if remaining <= 0 or await ticket.wait_superseded_or(
                    self._model_changed, remaining
                ):
                    return False
        finally:
            self.held -= 1
        return self.worker.ready

    def prepare(
        self, snap: Snapshot, *, invoked: bool, selection: Selection | None,
        document: TextDocument | None = None,
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
            # the most the engine may give the file's own text (_request's max_context_tokens
            # with the largest extra block): the window's pre-cut never takes what it would keep
            budget_tokens=s.context_tokens + self.extra_budget(s),
        )
        if looks_binary(window.prefix[-2000:] + window.suffix[:2000]):
            return None
        # Indent style is a property of the file: learn it from more than the model sees.
        indent_sample = text[max(0, offset - INDENT_SAMPLE_CHARS) : offset + INDENT_SAMPLE_CHARS]
        cursor = _cursor_context(window.prefix, window.suffix, snap.eol, indent_sample)
        syntax = self._syntax_view(snap, document, s) if selection is None else None
        stop = choose_stop(cursor, s.stop_mode)
        if syntax is not None:
            self.last_cursor_kind = syntax.kind
            cursor = dataclasses.replace(cursor, grammar=syntax.grammar, kind=syntax.kind)
            if s.stop_mode == "auto" and syntax.stop is not None:
                stop = syntax.stop
        block = self._context_block(snap, window.prefix, window.suffix, s)
        if selection is None:
            self._last_cursor = (snap, document)
        return Prepared(
            prefix=window.prefix,
            suffix=window.suffix,
            cursor=cursor,
            stop=stop,
            extra=block.chunks(),
            extra_tokens=block.tokens,
            candidates=s.num_candidates if invoked else 1,
            knobs=(s.model, s.device, s.quant, s.max_tokens, s.timeout_ms, s.context_tokens,
                   s.syntax),
            syntax=syntax,
        )

    def extra_budget(self, s: Settings) -> int:
        if s.extra_context_tokens is not None:
            return s.extra_context_tokens
        return extra_context_tokens(s.context_tokens, self.model_window, s.max_tokens,
                                    len(HOLE_ROWS))

    def _context_block(self, snap: Snapshot, prefix: str, suffix: str, s: Settings):
        """The stable extra-context block for this request (empty without a gatherer or a
        budget); the gatherer's failure costs the block, never the completion."""
        budget = self.extra_budget(s)
        self._block_changed = False
        if self.context is None or budget <= 0:
            self.last_context = ContextBlock()
            return self.last_context
        line = snap.text.count("\n", 0, snap.offset)
        own = (line - prefix.count("\n"), line + suffix.count("\n"))
        try:
            block, self._block_changed = self.context.current(
                snap.uri, snap.text, snap.offset, budget, own, snap.language_id)
        except Exception:
            log.exception("context gathering failed; the request goes without it")
            return ContextBlock()
        self.last_context = block
        return block

    def refresh_context(self) -> CompletionRequest | None:
        """After an open, close or save, or a pause long enough for the block's idle rule,
        while the user idles: the block re-gathered at the last request's cursor; when it
        changed, the request the next keystroke there would send (for the engine to
        pre-warm, so that keystroke reuses the new block's K/V), else None. The next
        request finds the block gathered and sends it unchanged."""
        if self._last_cursor is None or self.context is None:
            return None
        if self.extra_budget(self._settings()) <= 0:
            return None  # no block (the embedded model's default): nothing to prepare
        snap, document = self._last_cursor
        if document is not None and getattr(document, "source", snap.text) != snap.text:
            return None  # typed since: the next request gathers for itself
        prepared = self.prepare(snap, invoked=False, selection=None, document=document)
        if prepared is None or not self._block_changed or not prepared.extra:
            return None
        return self._request(prepared)

    @staticmethod
    def _syntax_view(snap: Snapshot, document: TextDocument | None, s: Settings):
        """The document's tree at the cursor; None (today's rules) without a grammar, with
        syntax off, or for a document that is not an LspTextDocument."""
        enable = getattr(document, "enable_syntax", None)
        if not s.syntax or enable is None:
            return None
        try:
            return view_at(enable(s.max_document_bytes), snap.text, snap.offset)
        except Exception:  # a grammar's failure must never cost the completion
            log.exception("syntax view failed; today's rules kept")
            return None

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
        # Every request supersedes the previous one for its document, even one answered from
        # a cache: the older one must not keep the model busy for a state that is gone.
        ticket = self.latest.begin(snap.uri)
        try:
            delay_ms = 0.0 if invoked else self.debounce.delay_ms(snap.uri)
            return await self._suggest(snap, document, ticket, delay_ms, invoked, selection)
        finally:
            self.latest.end(ticket)

    async def _suggest(
        self,
        snap: Snapshot,
        document: TextDocument,
        ticket: DocumentRequest,
        delay_ms: float,
        invoked: bool,
        selection: Selection | None,
    ) -> list[Suggestion]:
        prepared = self.prepare(snap, invoked=invoked, selection=selection, document=document)
        if prepared is None:
            return []
        if selection is None:
            reused = self.typed.reuse(snap.uri, snap.text, snap.offset)
            if reused is not None:  # an automatic request shows one, a manual one all
                return self._suggestions(reused[: prepared.candidates], snap, prepared, None)
        cached = self.cache.get(prepared.cache_key)
        if cached is not None:
            self._remember(snap, selection, cached)
            return self._suggestions(cached, snap, prepared, selection)
        if not self.worker.ready and not await self._model_ready(ticket):
            return []  # failed, closed, or still loading after timeoutMs
        if await ticket.wait_superseded(delay_ms / 1000):
            return []
        generation = self.generation
        timing = request_timing.current.get()
        # The hole's syntax check is built in a thread while the model runs; the rows are cut
        # by the thread that answers the job (the engine host's runner) right after the
        # model, so that the event loop serves the editor meanwhile (issue 23).
        check: Future | None = None if prepared.syntax is None else Future()
        answered: Future = Future()
        ticket.job = self.worker.submit(snap.uri, self._request(prepared), reply=functools.partial(
            self._cut_answer, answered, prepared, check, timing))
        if check is not None:  # (submitted second: the engine's thread starts first)
            try:
                _SYNTAX_THREADS.submit(_fulfil, check, request_timing.timed_in_thread, timing,
                                       hole_check, prepared.syntax)
            except Exception as exc:  # shut down (interpreter exit): the cut goes without it
                check.set_exception(exc)
        try:
            result, finished = await asyncio.wrap_future(answered)
        except asyncio.CancelledError:  # $/cancelRequest: stop the model between steps
            ticket.job.cancel.set()
            raise
        if result is not None:
            request_timing.engine_ran(result.stats.timings_ms.get(CALL_MS))
        if result is None or result.stats.cancelled or generation != self.generation:
            return []  # stopped, or made under settings (or a model) that no longer hold
        self.model_answers += 1
        self._count(finished)
        texts = finished.texts
        if not result.stats.timed_out:  # a finished answer is worth keeping even if superseded
            self.cache.put(prepared.cache_key, texts)
        if ticket.superseded.is_set():
            return []
        self._remember(snap, selection, texts)
        if document.version != snap.version or document.source is not snap.text:
            return self._late(texts, snap, document, prepared, selection)
        return self._suggestions(texts, snap, prepared, selection)

    def _request(self, prepared: Prepared) -> CompletionRequest:
        s = self._settings()
        limit = self.max_tokens_limit
        return CompletionRequest(
            prefix=_LONE_SURROGATE.sub("\ufffd", prepared.prefix),
            suffix=_LONE_SURROGATE.sub("\ufffd", prepared.suffix),
            max_tokens=s.max_tokens if limit is None else min(s.max_tokens, limit),
            stop=prepared.stop,
            num_candidates=prepared.candidates,
            temperature=0.0,  # candidate 0 greedy; the engine samples the extra ones hot
            seed=prepared.seed,
            # The extra block comes on top of the file's own context budget.
            max_context_tokens=s.context_tokens + (prepared.extra_tokens if prepared.extra
                                                   else 0),
            timeout_ms=s.timeout_ms,
            all_rows=prepared.syntax is not None,  # every hole length, for the syntax pick
            extra=prepared.extra,
        )

    def _finish(self, result: CompletionResult, prepared: Prepared,
                check=None) -> tuple[str, ...]:
        """`_cut`, counted."""
        finished = self._cut(result, prepared, check)
        self._count(finished)
        return finished.texts

    def _cut_answer(self, answered: Future, prepared: Prepared, check: Future | None, timing,
                    result: CompletionResult | None, _error: str | None) -> None:
        """The job's reply, on the thread that answered it: `answered` gets `result` and its
        cut (none when stopped). It waits for `check` at most SYNTAX_CHECK_WAIT_S."""
        if result is None or result.stats.cancelled:
            _fulfil(answered, lambda: (result, Finished(())))
            return
        try:
            built = check.result(SYNTAX_CHECK_WAIT_S) if check is not None else None
        except Exception:  # a grammar's failure (or no check) must never cost the completion
            log.exception("syntax check failed; the rows are shown without the syntax cut")
            # as in a language without a grammar (a pick would build the check again here)
            prepared, built = dataclasses.replace(prepared, syntax=None), None
        _fulfil(answered, lambda: (result, request_timing.timed_in_thread(
            timing, self._cut, result, prepared, built)))

    def _count(self, finished: Finished) -> None:
        """The syntax pick's counters of the status (the event loop's thread)."""
        picked = finished.picked
        if picked is not None and picked.opinion:
            self.syntax_judged += 1
            self.syntax_hidden_rows += picked.hidden
            self.syntax_emptied += not picked.texts

    def _cut(self, result: CompletionResult, prepared: Prepared, check=None) -> Finished:
        """Post-process every candidate; keep the distinct survivors, best first. With a
        syntax view, only those whose cut parses, ranked (lsp_server/syntax/pick.py). Any
        thread: it reads only its arguments."""
        raw = result.candidates or [
            Candidate(text=result.text, mean_confidence=0.0, span_length=0, ended=False)]
        rows: list[Row] = []
        for candidate in raw:
            text = postprocess(candidate.text, prepared.cursor, prepared.stop)
            if text is not None and text not in (row.text for row in rows):
                rows.append(Row(text, candidate.ended, candidate.mean_confidence))
        texts = [row.text for row in rows]
        picked = None
        if prepared.syntax is not None and rows:
            try:
                picked = pick(prepared.syntax, rows, want=prepared.candidates, check=check,
                              shown=lambda text: not is_useless(text, prepared.cursor))
            except Exception:  # a grammar's failure must never cost the completion
                log.exception("syntax pick failed; today's choice kept")
            else:
                if picked.opinion:
                    texts = [t for t in picked.texts if not is_useless(t, prepared.cursor)]
        return Finished(tuple(texts[: prepared.candidates]), picked)

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
        typed = inserted_at(snap.text, document.source, snap.offset)
        if typed is None or len(typed) > TypedThrough.MAX_TYPED or "\n" in typed or "\r" in typed:
            return []
        typed_length = len(typed)
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


def _fulfil(future: Future, function: Callable[..., Any], *args: Any) -> None:
    """Set `future` to `function(*args)`, or to what it raised; a future whose waiter gave up
    (a cancelled request) is left as it is."""
    try:
        value = function(*args)
    except BaseException as exc:  # the waiter's await raises it
        with contextlib.suppress(InvalidStateError):
            future.set_exception(exc)
    else:
        with contextlib.suppress(InvalidStateError):
            future.set_result(value)


def _cursor_context(prefix: str, suffix: str, eol: str, indent_sample: str) -> CursorContext:
    before_lines = prefix.split("\n")
    after_lines = suffix.split("\n")
    above: list[str] = []  # the nearest non-blank lines above the cursor line
    for line in reversed(before_lines[:-1]):
        if line.strip():
            above.insert(0, line)
            if len(above) == NEXT_LINES:
                break
    return CursorContext(
        line_before=before_lines[-1],
        line_after=after_lines[0],
        next_lines=after_lines[1 : 1 + NEXT_LINES],
        previous_line=above[-1] if above else "",
        previous_lines=above,
        indent_unit=detect_indent(indent_sample.replace("\r\n", "\n")),
        eol=eol,
    )

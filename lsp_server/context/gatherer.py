"""The context gatherer: what other code goes into a request's prompt (design/context.md §7.1).

Sources, in priority order within a token budget: definitions of the imported names used near
the cursor (Python), windows of open files most similar to the lines before the cursor, and
the places edited lately. Gathering stops adding sources once TIME_BUDGET_MS is spent.

`StableContext` keeps the block byte-identical between keystrokes, so the engine's K/V reuse
of the prompt's start keeps working: it is gathered again only when the cursor moved more than
MOVE_LINES lines, a document was opened, closed or saved, the user idled IDLE_S, or another
document asks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from pygls.uris import to_fs_path

from lsp_server.context.python_imports import ImportResolver, ImportScan, scan_imports
from lsp_server.context.recent_edits import RecentEdits
from lsp_server.context.snippet import ContextBlock, Snippet, estimate_tokens
from lsp_server.context.windows import WindowIndex
from lsp_server.context.workspace_files import WorkspaceFiles
from lsp_server.documents import CHARS_PER_TOKEN
from lsp_server.syntax.languages import grammar_for

TIME_BUDGET_MS = 20.0
MOVE_LINES = 32
IDLE_S = 1.0
OWN_LINES_BEFORE = 200  # the request's own context (settings contextLinesBefore/After)
OWN_LINES_AFTER = 60
MIN_WINDOW_LINES = 5  # a window cut to fit the budget keeps at least this many lines
SOURCES = frozenset({"imports", "windows", "recent"})


class OpenDocument(Protocol):
    """What the gatherer reads of an open document (pygls' TextDocument has all of it)."""

    uri: str
    language_id: str | None
    version: int | None

    @property
    def source(self) -> str: ...


@dataclass
class OpenFile:
    """An open document held without an editor (the CLI, the bench, the evaluations)."""

    uri: str
    language_id: str | None
    version: int
    source: str


@lru_cache(maxsize=4096)
def uri_path(uri: str) -> Path | None:
    try:
        path = to_fs_path(uri)
    except Exception:  # a malformed uri is no file
        return None
    return Path(path) if path else None


def _language(doc_language: str | None, path: Path | None) -> str:
    return grammar_for(doc_language, str(path) if path else None) or doc_language or (
        path.suffix if path else ""
    )


class ContextGatherer:
    def __init__(
        self,
        roots: list[Path],
        documents: Callable[[], Iterable[OpenDocument]],
        clock: Callable[[], float] = time.monotonic,
        time_budget_ms: float = TIME_BUDGET_MS,
    ):
        self.files = WorkspaceFiles(roots)
        self._documents = documents
        self._clock = clock
        self._time_budget_ms = time_budget_ms
        self._windows = WindowIndex()
        self._recent = RecentEdits()
        self._touched: dict[str, float] = {}  # uri -> when last opened or edited (MRU order)
        self._scan: tuple[str, str, ImportScan] | None = None  # (uri, text, its imports)
        self.generation = 0  # bumped on open, close and save: the stable block is stale
        self.out_of_time = 0  # gatherings that skipped a source for the time budget

    # ------------------------------------------------------------ document events
    def opened(self, uri: str) -> None:
        self._touched[uri] = self._clock()
        self.generation += 1
        self.files.forget_paths()

    def closed(self, uri: str) -> None:
        self._touched.pop(uri, None)
        self._windows.forget(uri)
        self._recent.forget(uri)
        self.generation += 1
        self.files.forget_paths()

    def saved(self, uri: str) -> None:
        self.generation += 1
        self.files.forget_paths()

    def edited(self, uri: str, line: int) -> None:
        now = self._clock()
        self._touched[uri] = now
        self._recent.record(uri, line, now)

    # ------------------------------------------------------------ gathering
    def gather(
        self,
        uri: str,
        text: str,
        offset: int,
        budget_tokens: int,
        own_lines: tuple[int, int] | None = None,
        language_id: str | None = None,
        sources: frozenset[str] = SOURCES,
    ) -> ContextBlock:
        """The extra context for a request at code-point `offset` of `uri`'s `text`.
        `own_lines`: the 0-based first and last line the request's own context covers;
        `sources`: which of SOURCES to use (all by default; evaluations compare them)."""
        if budget_tokens <= 0:
            return ContextBlock()
        started = self._clock()
        lines = text.split("\n")
        line = text.count("\n", 0, offset)
        if own_lines is None:
            own_lines = (max(0, line - OWN_LINES_BEFORE), line + OWN_LINES_AFTER)
        own = (uri, *own_lines)
        path = uri_path(uri)
        language = _language(language_id, path)
        docs = {doc.uri: doc for doc in self._documents()}

        def spent_ms() -> float:
            return (self._clock() - started) * 1000.0

        picked: list[Snippet] = []
        if language == "python" and "imports" in sources:
            picked.extend(self._import_snippets(uri, text, lines, line, path, docs))
        if "windows" not in sources:
            pass
        elif spent_ms() < self._time_budget_ms:
            picked.extend(self._window_snippets(
                lines[own_lines[0] : line + 1], own, docs, language,
                lambda: spent_ms() < self._time_budget_ms,
            ))
        else:
            self.out_of_time += 1
        if "recent" not in sources:
            pass
        elif spent_ms() < self._time_budget_ms:
            picked.extend(self._recent_snippets(own, docs))
        else:
            self.out_of_time += 1
        snippets = _fit(picked, budget_tokens)
        return ContextBlock(
            snippets=tuple(snippets),
            tokens=sum(s.tokens for s in snippets),
            ms=spent_ms(),
        )

    def _display_path(self, uri: str) -> str:
        path = uri_path(uri)
        if path is not None and self.files.inside(path) is not None:
            return self.files.relative(path)
        return path.name if path is not None else uri

    def _imports_of(self, uri: str, text: str, lines: list[str]) -> ImportScan:
        """scan_imports of this text, kept for the last document: gatherings at other
        cursors of the same version do not scan it again."""
        kept = self._scan
        if kept is not None and kept[0] == uri and (kept[1] is text or kept[1] == text):
            return kept[2]
        scan = scan_imports(lines)
        self._scan = (uri, text, scan)
        return scan

    def _import_snippets(self, uri, text, lines, line, path, docs) -> list[Snippet]:
        by_path = {}
        for doc in docs.values():
            doc_path = uri_path(doc.uri)
            real = self.files.inside(doc_path) if doc_path is not None else None
            if real is not None:
                by_path[real] = doc
        resolver = ImportResolver(
            self.files, lambda real: by_path[real].source if real in by_path else None
        )
        current = self.files.inside(path) if path is not None else None
        out = []
        scan = self._imports_of(uri, text, lines)
        for found in resolver.definitions_near(lines, line, current or path, scan=scan):
            if current is not None and found.path == current:
                continue
            out.append(Snippet(self.files.relative(found.path), found.text, found.start_line,
                               found.end_line, f"import:{found.name}"))
        return out

    def _window_snippets(self, target_lines, own, docs, language, time_left) -> list[Snippet]:
        order = sorted(docs.values(), key=lambda d: -self._touched.get(d.uri, 0.0))
        files = []
        for doc in order:
            if _language(doc.language_id, uri_path(doc.uri)) != language:
                continue
            files.append((doc.uri, doc.version, lambda doc=doc: doc.source))
        out = []
        for scored in self._windows.best(target_lines, files, own, time_left=time_left):
            window = scored.window
            text = "\n".join(scored.lines[window.start : window.end]).rstrip("\n")
            out.append(Snippet(self._display_path(window.key), text, window.start + 1,
                               window.end, f"window:{scored.score:.2f}"))
        return out

    def _recent_snippets(self, own, docs) -> list[Snippet]:
        out = []
        for key, first, last in self._recent.ranges(self._clock(), skip=own):
            doc = docs.get(key)
            if doc is None:
                continue
            lines = doc.source.split("\n")
            last = min(last, len(lines) - 1)
            if first > last:
                continue
            text = "\n".join(lines[first : last + 1])
            if text.strip():
                out.append(Snippet(self._display_path(key), text, first + 1, last + 1,
                                   "recent_edit"))
        return out


def _fit(snippets: list[Snippet], budget_tokens: int) -> list[Snippet]:
    """The snippets that fit the budget, in priority order; a window too long for what is
    left is cut to its first lines (at least MIN_WINDOW_LINES); exact repeats are dropped."""
    kept: list[Snippet] = []
    seen: set[tuple[str, str]] = set()
    left = budget_tokens
    for snippet in snippets:
        if (snippet.path, snippet.text) in seen:
            continue
        if snippet.tokens > left and snippet.why.startswith("window"):
            snippet = _shorten(snippet, left)
        if snippet is None or snippet.tokens > left:
            continue
        seen.add((snippet.path, snippet.text))
        kept.append(snippet)
        left -= snippet.tokens
    return kept


def _shorten(snippet: Snippet, budget_tokens: int) -> Snippet | None:
    """The snippet's first lines that fit `budget_tokens`, or None under MIN_WINDOW_LINES."""
    room = (budget_tokens - (snippet.tokens - estimate_tokens(snippet.text))) * CHARS_PER_TOKEN
    kept, size = [], -1
    for line in snippet.text.split("\n"):
        size += len(line) + 1
        if size > room:
            break
        kept.append(line)
    if len(kept) < MIN_WINDOW_LINES:
        return None
    return Snippet(snippet.path, "\n".join(kept), snippet.start_line,
                   snippet.start_line + len(kept) - 1, snippet.why)


class StableContext:
    """One block per server, re-gathered only when it must change (module doc)."""

    def __init__(self, gatherer: ContextGatherer):
        self.gatherer = gatherer
        self._block = ContextBlock()
        self._key: tuple | None = None  # (uri, line, generation, budget) it was gathered at
        self._last_activity: float | None = None
        self.changes = 0  # blocks whose content differed from the one before (pre-warms)
        self.gathers = 0

    def current(
        self,
        uri: str,
        text: str,
        offset: int,
        budget_tokens: int,
        own_lines: tuple[int, int] | None = None,
        language_id: str | None = None,
    ) -> tuple[ContextBlock, bool]:
        """The block for this request, and whether its content changed (then the engine
        should pre-warm it when idle)."""
        now = self.gatherer._clock()
        line = text.count("\n", 0, offset)
        idle = self._last_activity is not None and now - self._last_activity >= IDLE_S
        self._last_activity = now
        key = self._key
        fresh = (
            key is None
            or key[0] != uri
            or abs(key[1] - line) > MOVE_LINES
            or key[2] != self.gatherer.generation
            or key[3] != budget_tokens
            or idle
        )
        if not fresh:
            return self._block, False
        block = self.gatherer.gather(uri, text, offset, budget_tokens, own_lines, language_id)
        self.gathers += 1
        self._key = (uri, line, self.gatherer.generation, budget_tokens)
        # Changed is what the engine would see: a snippet's path or text. The same snippets
        # ranked with another score ("window:0.21" for 0.20) keep the block, so no pre-warm is
        # sent for it and no change is counted.
        changed = block.chunks() != self._block.chunks()
        if changed:
            self.changes += 1
            self._block = block
        return self._block, changed

    def activity(self) -> None:
        """An edit happened: the idle clock starts again."""
        self._last_activity = self.gatherer._clock()

    def idle_in(self) -> float:
        """Seconds until the idle rule would re-gather the block (0: it would now). The
        server re-gathers then, while the user still idles, and pre-warms a changed block,
        so the next keystroke finds it gathered and encoded instead of paying for both."""
        if self._last_activity is None:
            return 0.0
        return max(0.0, IDLE_S - (self.gatherer._clock() - self._last_activity))

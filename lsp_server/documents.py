"""Document snapshots and the fill-in-the-middle context window around the cursor.

A Snapshot is taken before the first await of a request: pygls applies didChange
notifications while a handler is suspended, so everything after that must read the snapshot,
never the live document. Positions are in the negotiated encoding (pygls' position codec:
UTF-8 for Neovim, UTF-16 for VS Code), converted with C-speed encodes (chunked_text.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

from lsprotocol import types
from pygls.workspace import TextDocument, Workspace
from pygls.workspace.position_codec import PositionCodec

from engine.denoise.fim import CHARS_PER_TOKEN_BOUND, precut_text
from lsp_server.chunked_text import ChunkedText, code_points_for, units
from lsp_server.lines import line_end, line_start, split_lines

if TYPE_CHECKING:
    from lsp_server.syntax.document_tree import DocumentTree

log = logging.getLogger(__name__)

# The server's estimate of a text's tokens without the model's tokenizer (code averages 3-4
# characters per token): the extra context's budget (lsp_server/context/). The window itself
# is not cut with it: the engine cuts the context on tokens (context_window below).
CHARS_PER_TOKEN = 3


@dataclass(frozen=True)
class Snapshot:
    """The document as it was when the request arrived; `text` is never mutated by pygls."""

    uri: str
    version: int | None
    language_id: str | None
    text: str
    offset: int  # cursor, in code points into `text`
    position: types.Position  # the cursor as the client sent it (client units)
    codec: PositionCodec

    @property
    def line_before(self) -> str:
        start = max(self.text.rfind("\n", 0, self.offset), self.text.rfind("\r", 0, self.offset))
        return self.text[start + 1 : self.offset]

    @property
    def line_after(self) -> str:
        end = len(self.text)
        for eol in ("\n", "\r"):
            found = self.text.find(eol, self.offset)
            if found != -1:
                end = min(end, found)
        return self.text[self.offset : end]

    @property
    def eol(self) -> str:
        """The file's line ending, from its first line break (CRLF files stay CRLF)."""
        first = self.text.find("\n")
        if first > 0 and self.text[first - 1] == "\r":
            return "\r\n"
        return "\n"


def take_snapshot(document: LspTextDocument, position: types.Position) -> Snapshot | None:
    """Snapshot `document` at `position`; None when the position lies outside the text.

    The position is found through the document's chunk index (no walk over the file).
    """
    offset = document.offset_at(position)
    if offset is None:
        return None
    return Snapshot(
        uri=document.uri,
        version=document.version,
        language_id=document.language_id,
        text=document.source,
        offset=offset,
        position=types.Position(line=position.line, character=position.character),
        codec=document.position_codec,
    )


def encoding_of(codec: PositionCodec) -> int:
    """The codec's unit as 8, 16 or 32 (pygls treats anything unknown as UTF-16)."""
    encoding = codec.encoding
    if encoding == types.PositionEncodingKind.Utf8:
        return 8
    return 32 if encoding == types.PositionEncodingKind.Utf32 else 16


def column_to_code_points(line: str, character: int, codec: PositionCodec) -> int | None:
    """The client's `character` (codec units) on `line` as a code-point column; None past
    the end of the line. C-speed encodes only: a long line costs no Python loop."""
    encoding = encoding_of(codec)
    if character > units(line, encoding):
        return None
    return code_points_for(line, character, encoding)


def offset_at(text: str, position: types.Position, codec: PositionCodec) -> int | None:
    """`position` (client units, LSP lines) as an offset into `text`; None when outside it."""
    if position.line < 0 or position.character < 0:
        return None
    start = line_start(text, position.line)
    if start is None:
        return None
    column = column_to_code_points(text[start : line_end(text, start)], position.character, codec)
    return None if column is None else start + column


class LspTextDocument(TextDocument):
    """pygls' TextDocument with LSP line breaks and edits that cost O(edit).

    pygls splits the whole source with str.splitlines on every incremental change and walks
    the line character by character to convert a column: O(file) of Python work per
    keystroke, and the wrong lines after a form feed or U+2028. Here the text lives in a
    ChunkedText; `source` joins it only when a request reads it.
    """

    _text: ChunkedText
    # The document's tree-sitter tree, kept in step with each edit (issue 23); None: no
    # grammar for its language, or not built yet (enable_syntax).
    syntax: DocumentTree | None = None

    def enable_syntax(self, max_bytes: int) -> DocumentTree | None:
        """Build the document's tree (parsed now, on didOpen, not on a request), if its
        language has a grammar; later edits keep it up to date."""
        from lsp_server.syntax.document_tree import DocumentTree
        from lsp_server.syntax.languages import grammar_for

        if self.syntax is None:
            grammar = grammar_for(self.language_id, self.uri)
            if grammar is None:
                return None
            self.syntax = DocumentTree(grammar, self.source, max_bytes=max_bytes)
            self.syntax.tree  # noqa: B018 -- the first parse, off the request path
        return self.syntax

    @property  # type: ignore[override]
    def _source(self) -> str:  # pygls' own code reads and assigns `_source`
        return self._text.text

    @_source.setter
    def _source(self, value: str | None) -> None:
        self._text = ChunkedText(value or "")

    @property
    def source(self) -> str:  # never read from disk: an unopened file has no text here
        return self._text.text

    @property
    def lines(self) -> tuple[str, ...]:
        return tuple(split_lines(self.source))

    def utf8_size(self) -> int:
        return self._text.utf8_size()

    def offset_at(self, position: types.Position) -> int | None:
        """`position` (client units) as an offset; None when it lies outside the text."""
        if position.line < 0 or position.character < 0:
            return None
        return self._text.offset_at(
            position.line, position.character, encoding_of(self.position_codec), clamp=False
        )

    def offset_at_position(self, client_position: types.Position) -> int:
        """Like offset_at, but a position past a line's end or the text's end is moved back
        onto it (what editors expect from an edit range that overshoots)."""
        offset = self._text.offset_at(
            client_position.line,
            client_position.character,
            encoding_of(self.position_codec),
            clamp=True,
        )
        assert offset is not None
        return offset

    def _apply_incremental_change(self, change: types.TextDocumentContentChangePartial) -> None:
        start = self.offset_at_position(change.range.start)
        end = max(start, self.offset_at_position(change.range.end))
        self._text.replace(start, end, change.text)
        if self.syntax is not None:
            self.syntax.edit(start, end, change.text)

    def _apply_full_change(self, change: types.TextDocumentContentChangeEvent) -> None:
        self._text = ChunkedText(change.text)
        if self.syntax is not None:
            self.syntax.replace_all(change.text)


class LspWorkspace(Workspace):
    """A pygls Workspace whose documents are LspTextDocuments; a change to a document that
    was never opened is ignored (pygls raises KeyError, shown to the user as a server error)."""

    def update_text_document(
        self,
        text_doc: types.VersionedTextDocumentIdentifier,
        change: types.TextDocumentContentChangeEvent,
    ) -> None:
        if unquote(text_doc.uri) not in self._text_documents:
            log.info("didChange for %s, which is not open: ignored", text_doc.uri)
            return
        super().update_text_document(text_doc, change)

    def _create_text_document(
        self,
        doc_uri: str,
        source: str | None = None,
        version: int | None = None,
        language_id: str | None = None,
    ) -> TextDocument:
        return LspTextDocument(
            doc_uri,
            source=source,
            version=version,
            language_id=language_id,
            sync_kind=self._sync_kind,
            position_codec=self.position_codec,
        )


@dataclass(frozen=True)
class ContextWindow:
    """The text the model sees: `prefix` + hole + `suffix`, with "\\n" line breaks."""

    prefix: str
    suffix: str


def context_window(
    text: str, offset: int, *, lines_before: int, lines_after: int, budget_tokens: int
) -> ContextWindow:
    """Whole lines around the cursor within the line limits (settings), "\\n" line breaks.

    The one context cut is the engine's, on tokens (engine/denoise/fim.py: cut_context, about
    3:1 prefix:suffix, a side's unused share going to the other). Here only what can never fit
    `budget_tokens` goes, by the engine's own character bound (fim.precut_text), so an
    enormous file is not sent whole: the prompt is the one the engine makes of the whole lines.
    """
    limit = max(budget_tokens, 0) * CHARS_PER_TOKEN_BOUND  # the scan's bound, as precut's
    prefix = _normalize_eol(_lines_before(text, offset, lines_before, limit))
    suffix = _normalize_eol(_lines_after(text, offset, lines_after, limit))
    prefix, suffix = precut_text(prefix, suffix, budget_tokens)
    return ContextWindow(prefix=prefix, suffix=suffix)


def _lines_before(text: str, offset: int, max_lines: int, max_chars: int) -> str:
    start = text.rfind("\n", 0, offset) + 1  # the cursor line's own beginning
    for _ in range(max_lines):
        if start == 0 or offset - start > max_chars:
            break
        start = text.rfind("\n", 0, start - 1) + 1
    return text[start:offset]


def _lines_after(text: str, offset: int, max_lines: int, max_chars: int) -> str:
    found = text.find("\n", offset)
    end = len(text) if found == -1 else found + 1  # the rest of the cursor line
    for _ in range(max_lines):
        if end >= len(text) or end - offset > max_chars:
            break
        found = text.find("\n", end)
        end = len(text) if found == -1 else found + 1
    return text[offset:end]


def _normalize_eol(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def detect_indent(sample: str) -> str:
    """The file's indent unit: "\\t", or N spaces from the most common indent step (default 4)."""
    tabs = spaces = 0
    steps: Counter[int] = Counter()
    previous = 0
    for line in sample.split("\n"):
        if not line.strip():
            continue
        if line.startswith("\t"):
            tabs += 1
            continue
        width = len(line) - len(line.lstrip(" "))
        if width:
            spaces += 1
        if width > previous:
            steps[width - previous] += 1
        previous = width
    if tabs > spaces:
        return "\t"
    for step, _count in steps.most_common():
        if step in (2, 3, 4, 8):
            return " " * step
    return "    "


def looks_binary(sample: str) -> bool:
    """True for text no code model should complete: NUL bytes or many control characters."""
    if "\x00" in sample:
        return True
    if not sample:
        return False
    controls = sum(1 for ch in sample if ord(ch) < 32 and ch not in "\t\n\r\f")
    return controls > max(8, len(sample) // 20)

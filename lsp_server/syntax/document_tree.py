"""One incremental tree-sitter tree per open document.

Edits arrive as the server applies them (code-point offsets into the document's text, or LSP
ranges in the client's units); each one is handed to `Tree.edit` at once, with byte offsets
and (row, byte column) points, and the re-parse waits for the next reader (about 1.4 ms after a
keystroke on a 2k-line file, design/context.md §5). Columns in the LSP are UTF-16 (VS Code) or
UTF-8 (Neovim) units; tree-sitter counts UTF-8 bytes: the conversion goes through code points.
"""

from __future__ import annotations

from dataclasses import dataclass

from lsp_server.chunked_text import code_points_for, units
from lsp_server.lines import line_end, line_start
from lsp_server.syntax.languages import new_parser

MAX_DOCUMENT_BYTES = 1_000_000  # larger documents get no tree (settings.maxDocumentBytes)
_ENCODING = ("utf-8", "surrogatepass")  # a lone surrogate keeps its 3 bytes, as everywhere


def utf8(text: str) -> bytes:
    return text.encode(*_ENCODING)


@dataclass(frozen=True)
class Point:
    """An LSP position: line and character in `encoding` units (8, 16 or 32)."""

    line: int
    character: int


class DocumentTree:
    """The document's text and its syntax tree, kept in step edit by edit.

    `tree` is None when the grammar is missing or the document is too large; callers then
    keep today's rules. Not thread-safe: the server applies edits and reads on its loop.
    """

    def __init__(self, grammar: str | None, text: str, max_bytes: int = MAX_DOCUMENT_BYTES):
        self.grammar = grammar
        self._parser = new_parser(grammar)
        self._max_bytes = max_bytes
        self._tree = None
        self._dirty = True
        self.reparses = 0  # parses done (full or incremental), for tests and stats
        self.replace_all(text)

    # ------------------------------------------------------------------ state
    @property
    def text(self) -> str:
        return self._text

    @property
    def source(self) -> bytes:
        return self._bytes

    @property
    def available(self) -> bool:
        return self._parser is not None and len(self._bytes) <= self._max_bytes

    @property
    def tree(self):
        """The up-to-date tree (parsed now if edits are pending), or None."""
        if not self.available:
            return None
        if self._dirty:
            old = self._tree
            self._tree = (
                self._parser.parse(self._bytes, old) if old else self._parser.parse(self._bytes)
            )
            self._dirty = False
            self.reparses += 1
        return self._tree

    def byte_offset(self, offset: int) -> int:
        """Code-point offset into `text` -> byte offset into `source`."""
        return len(utf8(self._text[:offset]))

    def point_at_byte(self, byte_offset: int) -> tuple[int, int]:
        """(row, byte column) of a byte offset, as tree-sitter counts them ("\\n" rows)."""
        row = self._bytes.count(b"\n", 0, byte_offset)
        return row, byte_offset - (self._bytes.rfind(b"\n", 0, byte_offset) + 1)

    # ------------------------------------------------------------------ edits
    def replace_all(self, text: str) -> None:
        """A full-text change (didOpen, or didChange without a range): parse from scratch."""
        self._text = text
        self._bytes = utf8(text)
        self._tree = None
        self._dirty = True

    def edit(self, start: int, end: int, new_text: str) -> None:
        """Replace code points [start, end) of the text by `new_text`."""
        if not 0 <= start <= end <= len(self._text):
            raise ValueError(f"edit [{start}, {end}) outside a text of {len(self._text)}")
        start_byte = self.byte_offset(start)
        old_end_byte = start_byte + len(utf8(self._text[start:end]))
        inserted = utf8(new_text)
        start_point = self.point_at_byte(start_byte)
        old_end_point = self.point_at_byte(old_end_byte)
        self._text = self._text[:start] + new_text + self._text[end:]
        self._bytes = self._bytes[:start_byte] + inserted + self._bytes[old_end_byte:]
        new_end_byte = start_byte + len(inserted)
        if self._tree is not None and self.available:
            self._tree.edit(
                start_byte=start_byte,
                old_end_byte=old_end_byte,
                new_end_byte=new_end_byte,
                start_point=start_point,
                old_end_point=old_end_point,
                new_end_point=self.point_at_byte(new_end_byte),
            )
        elif not self.available:
            self._tree = None
        self._dirty = True

    def offset_at(self, position: Point, encoding: int) -> int:
        """An LSP position (client units; LSP lines end at \\r\\n, \\n or \\r) -> code-point
        offset, clamped onto the text as editors expect of an overshooting range."""
        start = line_start(self._text, max(0, position.line))
        if start is None:
            return len(self._text)
        line = self._text[start : line_end(self._text, start)]
        character = min(max(0, position.character), units(line, encoding))
        return start + code_points_for(line, character, encoding)

    def apply_change(self, start: Point, end: Point, new_text: str, encoding: int) -> None:
        """An incremental LSP change: `range` start/end in the client's units (8, 16, 32)."""
        first = self.offset_at(start, encoding)
        last = max(first, self.offset_at(end, encoding))
        self.edit(first, last, new_text)

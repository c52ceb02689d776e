"""LSP lines in plain text: where a line starts and ends, and the lines themselves.

Shared by the documents and the syntax trees kept beside them (kept apart so neither imports
the other).
"""

from __future__ import annotations

import re

# LSP ends a line only at \r\n, \n or \r; str.splitlines also breaks at \f, \v, \x1c-\x1e,
# \x85, U+2028 and U+2029, which would shift every position after such a character.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_LINES_WITH_ENDS = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


def split_lines(text: str) -> list[str]:
    """The LSP lines of `text`, each with its line break (like splitlines(True), LSP breaks)."""
    return _LINES_WITH_ENDS.findall(text)


_CHUNK = 1 << 16  # characters counted per step when looking for a line


def line_start(text: str, line: int) -> int | None:
    """Offset where LSP line `line` begins; None when the text has fewer lines.

    Line breaks are counted a chunk at a time with str.count (C speed, no objects made); only
    the chunk holding the line is split.
    """
    if line == 0:
        return 0
    has_cr = "\r" in text
    position, remaining = 0, line
    while position < len(text):
        end = min(position + _CHUNK, len(text))
        if has_cr and text[end - 1] == "\r" and text[end : end + 1] == "\n":
            end += 1  # never split a \r\n pair between two chunks
        breaks = text.count("\n", position, end)
        if has_cr:
            breaks += text.count("\r", position, end) - text.count("\r\n", position, end)
        if breaks >= remaining:
            chunk = text[position:end]
            pieces = _LINE_BREAK.split(chunk, remaining) if has_cr else chunk.split("\n", remaining)
            return end - len(pieces[-1])
        remaining -= breaks
        position = end
    return None


def line_end(text: str, start: int) -> int:
    """Offset of the line break that ends the line beginning at `start` (or the text's end)."""
    found = _LINE_BREAK.search(text, start)
    return found.start() if found else len(text)

"""Document text kept as bounded chunks, so a keystroke costs O(edit), not O(document).

A Python str cannot be edited in place: applying each didChange to one string copies the
whole document, and converting a client column by walking the line is O(line) of Python work
(1.2 s per keystroke at the end of a 1 M-character line of `é`). Here the text is a list of
chunks of at most CHUNK code points, each with its length, LSP line breaks and extra UTF-8 /
UTF-16 units; an edit rewrites only the chunks it touches, and a position is found by
bisecting cumulative counts, then encoding at most the chunks the target line spans up to the
column (a C-speed scan, never a Python loop over characters).

Invariant: a "\\r\\n" pair never straddles two chunks, so per-chunk break counts add up.
"""

from __future__ import annotations

import bisect
import itertools
import re

CHUNK = 8192  # most code points per chunk: an edit re-encodes at most a few of these
_MERGE_BELOW = CHUNK // 4  # a chunk this small is merged into a neighbour after an edit
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_UTF8_CONTINUATION = bytes(range(0x80, 0xC0))


def units(text: str, encoding: int) -> int:
    """Length of `text` in the client's units: 8 (UTF-8 bytes), 16 (UTF-16 units) or 32."""
    if encoding == 32 or text.isascii():
        return len(text)
    if encoding == 8:
        return len(text.encode("utf-8", "surrogatepass"))
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def code_points_for(text: str, wanted: int, encoding: int) -> int:
    """The fewest leading code points of `text` that cover `wanted` client units (a column
    inside a multi-unit character rounds up to its end, as pygls does). Needs
    units(text) >= wanted; costs one encode of at most `wanted` code points."""
    if encoding == 32 or wanted <= 0 or text.isascii():
        return max(0, wanted)
    head = text[:wanted]  # every code point is at least one unit
    if encoding == 8:  # count the characters that start within the first `wanted` bytes
        data = head.encode("utf-8", "surrogatepass")[:wanted]
        return len(data.translate(None, _UTF8_CONTINUATION))
    low, high = (wanted + 1) // 2, len(head)  # a UTF-16 character is one or two units
    while low < high:
        middle = (low + high) // 2
        if units(head[:middle], 16) >= wanted:
            high = middle
        else:
            low = middle + 1
    return low


def _breaks(chunk: str) -> int:
    if "\r" not in chunk:
        return chunk.count("\n")
    return chunk.count("\n") + chunk.count("\r") - chunk.count("\r\n")


def _split(text: str) -> list[str]:
    """Pieces of at most about CHUNK code points, of even size, never cutting a \\r\\n."""
    if len(text) <= CHUNK:
        return [text] if text else []
    count = -(-len(text) // CHUNK)
    size = -(-len(text) // count)
    pieces, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if text[end - 1 : end + 1] == "\r\n":
            end += 1
        pieces.append(text[start:end])
        start = end
    return pieces


class ChunkedText:
    """Editable text with O(edit) replace and position lookups; `text` joins it on demand."""

    def __init__(self, text: str = ""):
        self._chunks: list[str] = []
        self._lengths: list[int] = []
        self._line_breaks: list[int] = []
        self._extra8: list[int] = []  # UTF-8 bytes beyond one per code point
        self._extra16: list[int] = []  # UTF-16 units beyond one per code point
        self._length = 0
        self._total_extra8 = 0
        self._starts: list[int] | None = None  # chunk i begins at _starts[i]; one extra entry
        self._lines_before: list[int] | None = None  # line breaks before chunk i
        self._text: str | None = None
        self._put(0, 0, _split(text))
        self._text = text

    # -- reading ------------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """The whole text; built once per edit, when a request asks for it."""
        if self._text is None:
            self._text = "".join(self._chunks)
        return self._text

    def __len__(self) -> int:
        return self._length

    def utf8_size(self) -> int:
        return self._length + self._total_extra8

    def line_start(self, line: int) -> int | None:
        """Offset where LSP line `line` begins; None past the last line."""
        if line <= 0:
            return 0 if line == 0 else None
        starts, lines_before = self._index()
        if line > lines_before[-1]:
            return None
        i = bisect.bisect_left(lines_before, line) - 1  # the chunk holding break number `line`
        chunk, wanted = self._chunks[i], line - lines_before[i]
        found = next(itertools.islice(_LINE_BREAK.finditer(chunk), wanted - 1, None))
        return starts[i] + found.end()

    def offset_at(self, line: int, character: int, encoding: int, *, clamp: bool) -> int | None:
        """(line, character in client units) as an offset. Outside the text: None, or with
        `clamp` the nearest end (of the line, or of the text)."""
        start = self.line_start(max(0, line))
        if start is None:
            return self._length if clamp else None
        remaining, position = max(0, character), start
        if remaining == 0:
            return start
        starts, _ = self._index()
        i = bisect.bisect_right(starts, start) - 1
        local = start - starts[i]
        while i < len(self._chunks):
            chunk = self._chunks[i]
            eol = _LINE_BREAK.search(chunk, local) if self._line_breaks[i] else None
            end = eol.start() if eol else len(chunk)
            if local == 0 and eol is None:  # the whole chunk is on this line: units are known
                size = self._lengths[i] + self._extra(i, encoding)
                piece = chunk
            else:
                piece = chunk[local:end]
                size = units(piece, encoding)
            if remaining <= size:
                return position + code_points_for(piece, remaining, encoding)
            remaining -= size
            position += len(piece)
            if eol is not None:
                break
            i, local = i + 1, 0
        return position if clamp else None

    # -- editing ------------------------------------------------------------------------------

    def replace(self, start: int, end: int, new: str) -> None:
        """Replace code points [start, end) with `new` (offsets already clamped)."""
        starts, _ = self._index()
        if not self._chunks:
            self._put(0, 0, _split(new))
        else:
            first = min(bisect.bisect_right(starts, start) - 1, len(self._chunks) - 1)
            last = min(bisect.bisect_right(starts, end) - 1, len(self._chunks) - 1)
            merged = (
                self._chunks[first][: start - starts[first]]
                + new
                + self._chunks[last][end - starts[last] :]
            )
            # A small result takes a neighbour along, so deletions do not leave dust behind.
            if len(merged) < _MERGE_BELOW and first > 0:
                first -= 1
                merged = self._chunks[first] + merged
            if len(merged) < _MERGE_BELOW and last + 1 < len(self._chunks):
                last += 1
                merged += self._chunks[last]
            self._put(first, last + 1, _split(merged))
        self._text = None

    def _put(self, begin: int, stop: int, pieces: list[str]) -> None:
        """Replace chunks[begin:stop] with `pieces`, then mend \\r\\n pairs at both seams."""
        self._forget(begin, stop)
        self._insert(begin, pieces)
        for seam in (begin + len(pieces), begin):
            self._mend(seam)
        self._starts = self._lines_before = None

    def _mend(self, seam: int) -> None:
        """Move a "\\n" onto the "\\r" that ends the chunk before `seam`."""
        if not 0 < seam < len(self._chunks):
            return
        left, right = self._chunks[seam - 1], self._chunks[seam]
        if left.endswith("\r") and right.startswith("\n"):
            self._forget(seam - 1, seam + 1)
            self._insert(seam - 1, [left + "\n", right[1:]] if len(right) > 1 else [left + "\n"])

    def _insert(self, at: int, pieces: list[str]) -> None:
        lengths = [len(piece) for piece in pieces]
        extra8 = [units(p, 8) - n for p, n in zip(pieces, lengths, strict=True)]
        extra16 = [units(p, 16) - n for p, n in zip(pieces, lengths, strict=True)]
        self._chunks[at:at] = pieces
        self._lengths[at:at] = lengths
        self._line_breaks[at:at] = [_breaks(piece) for piece in pieces]
        self._extra8[at:at] = extra8
        self._extra16[at:at] = extra16
        self._length += sum(lengths)
        self._total_extra8 += sum(extra8)

    def _forget(self, begin: int, stop: int) -> None:
        self._length -= sum(self._lengths[begin:stop])
        self._total_extra8 -= sum(self._extra8[begin:stop])
        for column in (self._chunks, self._lengths, self._line_breaks, self._extra8,
                       self._extra16):
            del column[begin:stop]

    def _extra(self, index: int, encoding: int) -> int:
        if encoding == 8:
            return self._extra8[index]
        return self._extra16[index] if encoding == 16 else 0

    def _index(self) -> tuple[list[int], list[int]]:
        """Cumulative offsets and line breaks per chunk (C-speed, rebuilt after an edit)."""
        if self._starts is None or self._lines_before is None:
            self._starts = [0, *itertools.accumulate(self._lengths)]
            self._lines_before = [0, *itertools.accumulate(self._line_breaks)]
        return self._starts, self._lines_before

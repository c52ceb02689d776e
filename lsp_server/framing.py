"""The LSP base protocol's framing (`Content-Length: N` headers, then N bytes), read defensively.

pygls' reader trusts the header: `Content-Length: 4611686018427387904` makes it allocate the
body (MemoryError), a length beyond int64 raises OverflowError, and any malformed frame leaves it
waiting for a header that never comes, so every later message is lost. This decoder is fed raw
bytes and returns whole bodies. A message over `max_body` bytes is refused without being
allocated; a malformed header (no or non-numeric length, zero, negative, a header line too
long) is logged in one line. After either, bytes are skipped up to the next line that starts
with `Content-Length:`, so the next well-formed message is read as usual.

Header names are matched case-insensitively and a bare LF ends a header line as well as CRLF
(lenient in what we accept); other headers (Content-Type) are ignored.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # far above any real LSP message (a 1 MB file's didOpen)
MAX_HEADER_BYTES = 8192  # a whole header block; real ones are under 100 bytes
_HEADER_AT_LINE = re.compile(rb"(?:^|\n)(content-length[ \t]*:)", re.IGNORECASE)
_HEADER_AFTER_NEWLINE = re.compile(rb"\n(content-length[ \t]*:)", re.IGNORECASE)
_MAX_DIGITS = 18  # any longer number is over the limit (and int() of it may be refused)


class FrameDecoder:
    """Bytes in, message bodies out; bounded memory whatever the peer sends."""

    def __init__(self, max_body: int = MAX_MESSAGE_BYTES):
        self.max_body = max_body
        self._buffer = bytearray()
        self._length: int | None = None  # the body being read, once its header is complete
        self._resyncing = False  # skipping to the next `Content-Length:` line
        self._line_start = True  # the buffer begins at the start of a line
        self.dropped = 0  # frames refused or skipped

    def feed(self, data: bytes) -> list[bytes]:
        """Take the next bytes of the stream; return every body they complete."""
        self._buffer += data
        bodies: list[bytes] = []
        while True:
            if self._length is not None:
                if len(self._buffer) < self._length:
                    break
                bodies.append(bytes(self._buffer[: self._length]))
                del self._buffer[: self._length]
                self._length = None
                self._line_start = True
            elif self._resyncing:
                if not self._skip_to_header():
                    break
            elif not self._read_header():
                break
        return bodies

    def _read_header(self) -> bool:
        """Parse one header block at the buffer's start; False when more bytes are needed."""
        while self._buffer.startswith((b"\r\n", b"\n")):  # a stray blank line: no frame
            del self._buffer[: 2 if self._buffer.startswith(b"\r\n") else 1]
        end = _header_end(self._buffer)
        if end is None:
            if len(self._buffer) > MAX_HEADER_BYTES:
                self._refuse(f"a header block over {MAX_HEADER_BYTES} bytes")
                return True
            return False
        block, body_start = bytes(self._buffer[:end]), end
        length, problem = _content_length(block)
        if problem is None and length is not None and length > self.max_body:
            problem = f"Content-Length {length} is over the {self.max_body}-byte limit"
        if problem is not None:
            del self._buffer[:body_start]
            self._refuse(problem)
            return True
        del self._buffer[:body_start]
        self._length = length
        return True

    def _refuse(self, problem: str) -> None:
        self.dropped += 1
        log.warning("dropped a malformed message (%s); waiting for the next header", problem)
        self._resyncing = True
        self._line_start = True

    def _skip_to_header(self) -> bool:
        """Drop bytes up to the next `Content-Length:` line; False when more are needed."""
        pattern = _HEADER_AT_LINE if self._line_start else _HEADER_AFTER_NEWLINE
        found = pattern.search(self._buffer)
        if found is not None:
            del self._buffer[: found.start(1)]
            self._resyncing = False
            self._line_start = True
            return True
        newline = self._buffer.rfind(b"\n")
        if newline != -1:  # keep a partial last line: it may be the header's beginning
            del self._buffer[: newline + 1]
            self._line_start = True
        if len(self._buffer) > MAX_HEADER_BYTES:  # a long line cannot hold a header start
            self._buffer.clear()
            self._line_start = False
        return False


def _header_end(buffer: bytearray) -> int | None:
    """Offset just past the blank line that ends the header block, or None."""
    limit = min(len(buffer), MAX_HEADER_BYTES + 4)
    ends = [i + n for i, n in ((buffer.find(b"\n\r\n", 0, limit), 3),
                               (buffer.find(b"\n\n", 0, limit), 2)) if i != -1]
    return min(ends) if ends else None


def _content_length(block: bytes) -> tuple[int | None, str | None]:
    """(length, None) or (None, why the header block is malformed)."""
    length = None
    for line in block.replace(b"\r\n", b"\n").split(b"\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            return None, f"header line {_show(line)} has no colon"
        if name.strip().lower() != b"content-length":
            continue
        digits = value.strip()
        if not digits.isdigit():
            return None, f"Content-Length {_show(digits)} is not a number"
        if len(digits.lstrip(b"0")) > _MAX_DIGITS:
            return None, f"Content-Length {_show(digits)} is over the limit"
        length = int(digits)
        if length == 0:
            return None, "Content-Length is 0"
    if length is None:
        return None, "no Content-Length header"
    return length, None


def _show(raw: bytes, most: int = 40) -> str:
    text = raw[:most].decode("ascii", "backslashreplace")
    return repr(text + ("…" if len(raw) > most else ""))

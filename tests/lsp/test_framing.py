"""FrameDecoder: whole bodies out whatever the chunking; malformed frames skipped, one log
line each, without allocating what a header claims; the next well-formed frame still read."""

import json
import logging

import pytest

from lsp_server.framing import MAX_HEADER_BYTES, FrameDecoder


def frame(message: dict, header: bytes = b"Content-Length") -> bytes:
    body = json.dumps(message).encode()
    return header + b": %d\r\n\r\n" % len(body) + body


GOOD = frame({"id": 1})


def decode(data: bytes, step: int | None = None) -> tuple[FrameDecoder, list[bytes]]:
    """Feed `data` in chunks of `step` bytes (all at once: None) to a 1 MB-bound decoder."""
    decoder, bodies = FrameDecoder(max_body=1 << 20), []
    step = step or len(data)
    for start in range(0, len(data), step):
        bodies += decoder.feed(data[start : start + step])
    return decoder, bodies


@pytest.mark.parametrize("step", [None, 1, 3, 17])
def test_bodies_come_out_whole_whatever_the_chunking(step):
    data = GOOD + frame({"id": "é"}) + b"Content-Length: 2\r\nContent-Type: x\r\n\r\n{}"
    decoder, bodies = decode(data, step)
    assert bodies == [b'{"id": 1}', b'{"id": "\\u00e9"}', b"{}"]
    assert decoder.dropped == 0


@pytest.mark.parametrize(
    "bad",
    [
        b"Content-Length: 4611686018427387904\r\n\r\n",
        b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n",  # int() would refuse to parse it
        b"Content-Length: 2000000\r\n\r\n",  # over this decoder's 1 MB bound
        b"Content-Length: x1\r\n\r\n",
        b"Content-Length: -1\r\n\r\n",
        b"Content-Length: 0\r\n\r\n",
        b"Content-Type: a\r\n\r\n",
        b"no colon here\r\n\r\n",
        b"y" * (MAX_HEADER_BYTES + 10) + b"\r\n",
    ],
)
@pytest.mark.parametrize("step", [None, 1, 64])
def test_a_malformed_frame_is_dropped_and_the_next_one_read(bad, step, caplog):
    with caplog.at_level(logging.WARNING, logger="lsp_server.framing"):
        decoder, bodies = decode(bad + GOOD + GOOD, step)
    assert bodies == [b'{"id": 1}', b'{"id": 1}']
    assert decoder.dropped == 1 and len(caplog.records) == 1
    assert len(decoder._buffer) == 0


def test_lowercase_names_lf_only_lines_and_stray_blank_lines_are_accepted():
    lf = GOOD.replace(b"\r\n", b"\n")
    decoder, bodies = decode(b"\r\n" + frame({"id": 1}, b"content-length") + b"\n" + lf)
    assert bodies == [b'{"id": 1}', b'{"id": 1}'] and decoder.dropped == 0


def test_a_long_garbage_line_is_discarded_as_it_comes():
    decoder = FrameDecoder()
    decoder.feed(b"Content-Length: -1\r\n\r\n")
    for _ in range(100):  # 6.4 MB of a line with no break: never kept
        assert decoder.feed(b"z" * 65536) == []
        assert len(decoder._buffer) <= MAX_HEADER_BYTES
    assert decoder.feed(b"\n" + GOOD) == [b'{"id": 1}']


def test_a_header_inside_a_line_is_not_mistaken_for_a_frame():
    # After a dropped frame, "Content-Length:" in the middle of a line (a JSON string in a
    # body that is skipped) must not restart framing there.
    _, bodies = decode(b"Content-Length: -1\r\n\r\n" + b'{"text": "Content-Length: 5"}\n' + GOOD)
    assert bodies == [b'{"id": 1}']

"""Snapshots (positions through pygls' codec), the context window, indent and binary checks."""

import pytest
from lsprotocol import types
from pygls.workspace import TextDocument
from pygls.workspace.position_codec import PositionCodec

from lsp_server.documents import (
    CHARS_PER_TOKEN,
    context_window,
    detect_indent,
    looks_binary,
    take_snapshot,
)

UTF8 = PositionCodec(types.PositionEncodingKind.Utf8)
UTF16 = PositionCodec(types.PositionEncodingKind.Utf16)


def doc(text: str, codec: PositionCodec = UTF16) -> TextDocument:
    return TextDocument("file:///t.py", text, version=1, position_codec=codec)


def at(line: int, character: int) -> types.Position:
    return types.Position(line=line, character=character)


@pytest.mark.parametrize(
    ("codec", "character"),
    [(UTF16, len("x = 'é😀") + 1), (UTF8, len("x = 'é😀".encode()))],  # emoji: 2 UTF-16 units
)
def test_multibyte_cursor_offset_in_each_encoding(codec, character):
    text = "# top\nx = 'é😀' + y\n"
    snapshot = take_snapshot(doc(text, codec), at(1, character))
    assert snapshot is not None
    assert snapshot.line_before == "x = 'é😀"
    assert snapshot.line_after == "' + y"
    assert text[: snapshot.offset].endswith("é😀")


def test_positions_past_the_end_are_refused():
    document = doc("ab\ncd")
    assert take_snapshot(document, at(0, 3)) is None  # past the end of line 0
    assert take_snapshot(document, at(5, 0)) is None  # past the last line
    assert take_snapshot(document, at(2, 0)) is None  # no line 2 without a final newline
    assert take_snapshot(document, at(1, 2)).offset == 5  # end of the last line is fine


def test_position_after_final_newline_and_in_empty_file():
    assert take_snapshot(doc("ab\n"), at(1, 0)).offset == 3
    assert take_snapshot(doc(""), at(0, 0)).offset == 0


def test_crlf_file_keeps_its_line_ending_and_cursor():
    document = doc("def f():\r\n    return 1\r\n")
    snapshot = take_snapshot(document, at(1, 4))
    assert snapshot.eol == "\r\n"
    assert snapshot.line_before == "    " and snapshot.line_after == "return 1"
    assert take_snapshot(document, at(0, 9)) is None  # the \r is not a column


def test_snapshot_does_not_follow_later_edits():
    document = doc("abc\n")
    snapshot = take_snapshot(document, at(0, 3))
    document.apply_change(
        types.TextDocumentContentChangePartial(
            range=types.Range(start=at(0, 3), end=at(0, 3)), text="def"
        )
    )
    assert document.source == "abcdef\n"
    assert snapshot.text == "abc\n" and snapshot.line_before == "abc"


def test_context_window_takes_whole_lines_within_line_limits():
    text = "l1\nl2\nl3\ncur|sor\nn1\nn2\nn3\n"
    offset = text.index("|")
    text = text.replace("|", "")
    window = context_window(text, offset, lines_before=2, lines_after=1, budget_tokens=1000)
    assert window.prefix == "l2\nl3\ncur"
    assert window.suffix == "sor\nn1\n"


def test_context_window_splits_budget_about_3_to_1():
    line = "x" * 29 + "\n"  # 30 chars per line
    text = line * 200 + line * 200
    offset = len(line) * 200
    budget = 100  # tokens
    window = context_window(text, offset, lines_before=1000, lines_after=1000, budget_tokens=budget)
    chars = budget * CHARS_PER_TOKEN
    assert 0.7 * chars * 0.75 <= len(window.prefix) <= chars * 0.75
    assert 0.5 * chars * 0.25 <= len(window.suffix) <= chars * 0.25
    assert window.prefix.endswith("\n") and window.suffix.endswith("\n")  # whole lines only


def test_unused_suffix_budget_goes_to_the_prefix():
    text = ("y" * 29 + "\n") * 200
    window = context_window(text, len(text), lines_before=1000, lines_after=10, budget_tokens=100)
    assert window.suffix == ""
    assert len(window.prefix) > 100 * CHARS_PER_TOKEN * 0.75


def test_context_window_normalizes_crlf():
    text = "a\r\nb\r\nc"
    window = context_window(text, 4, lines_before=5, lines_after=5, budget_tokens=100)
    assert window.prefix == "a\nb" and window.suffix == "\nc"


def test_detect_indent():
    assert detect_indent("def f():\n\tif x:\n\t\treturn 1\n") == "\t"
    assert detect_indent("def f():\n  if x:\n    return 1\n") == "  "
    assert detect_indent("def f():\n    return 1\n") == "    "
    assert detect_indent("x = 1\n") == "    "  # nothing to learn from: the common default


def test_looks_binary():
    assert looks_binary("abc\x00def")
    assert looks_binary("".join(chr(i % 32) for i in range(400)))
    assert not looks_binary("def f():\n\treturn 'é😀'\n")

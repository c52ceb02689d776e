"""Snapshots (positions through pygls' codec), the context window, indent and binary checks."""

import pytest
from lsprotocol import types
from pygls.workspace.position_codec import PositionCodec

from engine.denoise.fim import CHARS_PER_TOKEN_BOUND, precut_text
from lsp_server.documents import (
    LspTextDocument,
    context_window,
    detect_indent,
    line_start,
    looks_binary,
    offset_at,
    split_lines,
    take_snapshot,
)

UTF8 = PositionCodec(types.PositionEncodingKind.Utf8)
UTF16 = PositionCodec(types.PositionEncodingKind.Utf16)


def doc(text: str, codec: PositionCodec = UTF16) -> LspTextDocument:
    return LspTextDocument("file:///t.py", text, version=1, position_codec=codec)


def lsp_doc(text: str, codec: PositionCodec) -> LspTextDocument:
    return LspTextDocument("file:///t.py", text, version=1, position_codec=codec)


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


def test_context_window_drops_only_what_can_never_fit_the_budget():
    # Issue 22: the server cut the window a second way (3 characters a token, 3:1 by
    # characters, whole lines); now only the engine's own bound applies, the engine's token
    # cut doing the rest (one context cut).
    line = "x" * 29 + "\n"  # 30 chars per line
    text = line * 200 + line * 200
    offset = len(line) * 200
    budget = 50  # tokens: a bound of 50 * CHARS_PER_TOKEN_BOUND characters a side
    window = context_window(text, offset, lines_before=1000, lines_after=1000, budget_tokens=budget)
    bound = budget * CHARS_PER_TOKEN_BOUND
    assert (window.prefix, window.suffix) == precut_text(text[:offset], text[offset:], budget)
    assert len(window.prefix) == len(window.suffix) == bound < len(text) // 2
    roomy = context_window(text, offset, lines_before=1000, lines_after=10, budget_tokens=10**6)
    assert roomy.prefix == text[:offset]  # the line limits only: 10 lines after the cursor line
    assert roomy.suffix == line * 11


def test_a_long_files_prompt_is_the_engines_cut_of_its_whole_lines(memorized_model):
    """The server's pre-cut takes nothing the engine would keep: the token rows the engine
    makes of the window are the ones it makes of the whole lines around the cursor."""
    from engine.denoise import fim
    from engine.engine import Engine

    rows = [f"    value_{i} = compute(value_{i - 1}, {i} * factor)  # step {i}\n"
            for i in range(1, 400)]
    text = "def long():\n" + "".join(rows)
    offset = text.index("value_200 =")
    budget_tokens = 40  # the server's window budget; the engine's is the same request's
    window = context_window(text, offset, lines_before=200, lines_after=60,
                            budget_tokens=budget_tokens)
    whole = context_window(text, offset, lines_before=200, lines_after=60,
                           budget_tokens=10**6)
    assert len(window.prefix) < len(whole.prefix)  # the pre-cut did cut
    engine = Engine.load(str(memorized_model))
    try:
        budget = fim.context_budget(engine.args, 16, budget_tokens)
        assert engine._context_ids(window.prefix, window.suffix, budget) == (
            engine._context_ids(whole.prefix, whole.suffix, budget))
    finally:
        engine.close()


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


# -- LSP line breaks: only \n, \r\n and \r end a line ----------------------------------------

ODD_BREAKS = "a = '\x0c\x0b\x1c\x85\u2028\u2029'  # form feed, U+2028: not line breaks in LSP\n"


@pytest.mark.parametrize("codec", [UTF8, UTF16])
def test_form_feed_and_u2028_before_the_cursor_do_not_shift_lines(codec):
    text = ODD_BREAKS + "def f():\n    return 1\n"
    assert len(text.splitlines()) > 3  # what pygls' default lines would count
    snapshot = take_snapshot(lsp_doc(text, codec), at(2, 4))
    assert snapshot is not None
    assert snapshot.line_before == "    " and snapshot.line_after == "return 1"
    column = codec.client_num_units("a = '\x0c\x0b\x1c\x85\u2028")
    on_first_line = take_snapshot(lsp_doc(text, codec), at(0, column))
    assert text[: on_first_line.offset] == "a = '\x0c\x0b\x1c\x85\u2028"


def test_split_lines_uses_lsp_breaks_only():
    assert split_lines("a\x0cb\u2028c\r\nd\re\nf") == ["a\x0cb\u2028c\r\n", "d\r", "e\n", "f"]
    assert split_lines("") == [] and split_lines("x\n") == ["x\n"]
    assert LspTextDocument("file:///t.py", "a\u2028b\nc").lines == ("a\u2028b\n", "c")


def test_incremental_edits_after_odd_breaks_land_on_the_right_line():
    document = lsp_doc(ODD_BREAKS + "x = 1\r\ny = 2\n", UTF16)
    document.apply_change(
        types.TextDocumentContentChangePartial(
            range=types.Range(start=at(1, 4), end=at(1, 5)), text="42"
        )
    )
    document.apply_change(  # an insertion at the very end, and an overshooting range
        types.TextDocumentContentChangePartial(
            range=types.Range(start=at(3, 0), end=at(9, 9)), text="z = 3\n"
        )
    )
    assert document.source == ODD_BREAKS + "x = 42\r\ny = 2\nz = 3\n"


def test_lone_cr_lines_and_multibyte_edit_columns():
    document = lsp_doc("a\rbé😀c\rd", UTF16)
    assert take_snapshot(document, at(1, 4)).line_before == "bé😀"  # emoji: 2 UTF-16 units
    document.apply_change(
        types.TextDocumentContentChangePartial(
            range=types.Range(start=at(1, 2), end=at(1, 4)), text="!"
        )
    )
    assert document.source == "a\rbé!c\rd"


# -- large documents -------------------------------------------------------------------------


def test_line_start_and_offsets_on_a_large_file():
    text = "x = 1\n" * 200_000 + "tail = 'é'\n"
    assert line_start(text, 200_000) == 6 * 200_000
    assert line_start(text, 200_002) is None
    assert offset_at(text, at(200_000, 10), UTF8) == 6 * 200_000 + 9  # é: two UTF-8 units
    assert offset_at(text, at(200_000, 12), UTF8) is None  # past the end of that line


def test_utf8_size_counts_bytes_through_edits():
    document = doc("x" * 10 + "é" * 6)
    assert document.utf8_size() == 22  # é: two bytes in one code point
    document.apply_change(
        types.TextDocumentContentChangePartial(range=types.Range(start=at(0, 0), end=at(0, 12)),
                                               text="😀")
    )
    assert document.source == "😀" + "é" * 4 and document.utf8_size() == 12


def test_line_start_agrees_with_lsp_lines_across_chunk_boundaries(monkeypatch):
    import random

    import lsp_server.lines as lines_module

    monkeypatch.setattr(lines_module, "_CHUNK", 5)  # tiny chunks: \r\n pairs fall on the edges
    pieces = ["a", "é", "\n", "\r", "\r\n", "\u2028", "\x0c"]
    rng = random.Random(7)
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        lines = split_lines(text)
        starts = [sum(len(line) for line in lines[:index]) for index in range(len(lines) + 1)]
        # A last line exists after a final break (or in an empty text), empty.
        count = len(lines) + (not text or text.endswith(("\n", "\r")))
        for line in range(count + 2):
            expected = starts[line] if line < count else None
            assert line_start(text, line) == expected, (text, line)


# -- chunked text: edits and positions against a plain reference ------------------------------

FUZZ_PIECES = ["a", "b", "é", "中", "😀", "\n", "\r", "\r\n", "\u2028", "\ud800", "\t"]
ENCODINGS = {8: UTF8, 16: UTF16, 32: PositionCodec(types.PositionEncodingKind.Utf32)}


def reference_offset(text: str, line: int, character: int, encoding: int, clamp: bool):
    """A position the slow, obvious way: split into LSP lines, walk the line's characters."""
    lines = split_lines(text)
    count = len(lines) + (not text or text.endswith(("\n", "\r")))
    if line >= count:
        return len(text) if clamp else None
    start = sum(len(x) for x in lines[:line])
    content = lines[line].rstrip("\r\n") if line < len(lines) else ""
    used = 0
    for index, ch in enumerate(content):
        if used >= character:
            return start + index
        used += {8: len(ch.encode("utf-8", "surrogatepass")), 16: 1 + (ord(ch) > 0xFFFF),
                 32: 1}[encoding]
    return start + len(content) if used >= character or clamp else None


def test_random_edits_and_positions_match_a_plain_reference(monkeypatch):
    """1000 random documents, each edited 8 times at random (overshooting) ranges in random
    encodings, with tiny chunks so that edits cross chunk seams and \\r\\n pairs meet them."""
    import random

    import lsp_server.chunked_text as chunked

    monkeypatch.setattr(chunked, "CHUNK", 4)
    monkeypatch.setattr(chunked, "_MERGE_BELOW", 2)
    rng = random.Random(11)

    def random_text(most: int) -> str:
        return "".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(0, most)))

    def random_position(text: str) -> types.Position:
        lines = split_lines(text)
        line = rng.randint(0, len(lines) + 1)
        return at(line, rng.randint(0, 2 + (len(lines[line]) * 2 if line < len(lines) else 0)))

    for case in range(1000):
        encoding = rng.choice([8, 16, 32])
        text = random_text(40)
        document = lsp_doc(text, ENCODINGS[encoding])
        for _ in range(8):
            start, end = random_position(text), random_position(text)
            if (end.line, end.character) < (start.line, start.character):
                start, end = end, start
            new = random_text(12)
            a = reference_offset(text, start.line, start.character, encoding, clamp=True)
            b = max(a, reference_offset(text, end.line, end.character, encoding, clamp=True))
            text = text[:a] + new + text[b:]
            document.apply_change(
                types.TextDocumentContentChangePartial(range=types.Range(start=start, end=end),
                                                       text=new)
            )
            assert document.source == text, case
            assert document.utf8_size() == len(text.encode("utf-8", "surrogatepass"))
            probe = random_position(text)
            expected = reference_offset(text, probe.line, probe.character, encoding, clamp=False)
            assert document.offset_at(probe) == expected, (case, text, probe)
            assert offset_at(text, probe, ENCODINGS[encoding]) == expected, (case, text, probe)

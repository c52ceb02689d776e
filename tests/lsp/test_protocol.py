"""LSP conversion: ranges over auto-closed characters, item shapes, capability checks."""

from lsprotocol import types
from pygls.workspace.position_codec import PositionCodec

from lsp_server.protocol import (
    Suggestion,
    client_has_inline_completion,
    completion_list,
    cover_auto_closed,
    inline_items,
    shift,
)

UTF8 = PositionCodec(types.PositionEncodingKind.Utf8)
UTF16 = PositionCodec(types.PositionEncodingKind.Utf16)


def pos(line, character):
    return types.Position(line=line, character=character)


def test_auto_closed_characters_are_covered_and_rewritten():
    assert cover_auto_closed("a, b", ")") == ("a, b)", ")")
    assert cover_auto_closed("hello", '")') == ('hello")', '")')


def test_closers_the_suggestion_writes_itself_are_not_doubled():
    assert cover_auto_closed("a):", ")") == ("a):", ")")
    assert cover_auto_closed("x)", ")]") == ("x)]", ")]")
    assert cover_auto_closed("'hi'", ")") == ("'hi')", ")")  # balanced quotes consume nothing


def test_no_range_extension_when_code_follows_or_for_multiline_text():
    assert cover_auto_closed("a", ") + 1") == ("a", "")
    assert cover_auto_closed("a\nb", ")") == ("a\nb", "")
    assert cover_auto_closed("a", "") == ("a", "")


def test_shift_counts_client_units():
    assert shift(pos(3, 5), "é😀)", UTF16) == pos(3, 5 + 1 + 2 + 1)
    assert shift(pos(3, 5), "é😀)", UTF8) == pos(3, 5 + 2 + 4 + 1)


def test_inline_items_carry_their_range():
    items = inline_items([Suggestion(text="x)", start=pos(1, 4), end=pos(1, 5))])
    assert items[0].insert_text == "x)"
    assert items[0].range == types.Range(start=pos(1, 4), end=pos(1, 5))


def test_completion_fallback_edits_from_the_word_start():
    suggestion = Suggestion(text="nt(x)\nmore", start=pos(2, 10), end=pos(2, 10))
    result = completion_list([suggestion], line_before="    é = pri", codec=UTF8)
    item = result.items[0]
    assert result.is_incomplete
    assert item.label == "print(x)"
    assert item.text_edit.new_text == "print(x)\nmore"
    assert item.text_edit.range.start == pos(2, 7)  # 10 - len("pri")


def test_client_inline_completion_capability():
    assert not client_has_inline_completion(types.ClientCapabilities())
    with_inline = types.ClientCapabilities(
        text_document=types.TextDocumentClientCapabilities(
            inline_completion=types.InlineCompletionClientCapabilities()
        )
    )
    assert client_has_inline_completion(with_inline)

"""DocumentTree: edits in code points or LSP units keep the tree equal to a fresh parse."""

from __future__ import annotations

import random

import pytest

from lsp_server.syntax import DocumentTree, Point, kind_at
from lsp_server.syntax.languages import grammar_for, new_parser

SOURCE = 'def greet(name):\n    """Say hi 👋 to ñame."""\n    return f"hi {name}"\n'


def _sexp(tree) -> str:
    return str(tree.root_node)


def _fresh(grammar: str, text: str) -> str:
    return _sexp(new_parser(grammar).parse(text.encode("utf-8")))


def test_edits_keep_the_tree_equal_to_a_fresh_parse():
    doc = DocumentTree("python", SOURCE)
    assert doc.tree is not None
    rng = random.Random(0)
    pieces = ["x", "(", ")", "\n    ", "é", "👋", ":", " ", "return 1\n", ""]
    for _ in range(60):
        start = rng.randrange(len(doc.text) + 1)
        end = min(len(doc.text), start + rng.randrange(4))
        doc.edit(start, end, rng.choice(pieces))
        assert doc.source == doc.text.encode("utf-8")
        assert _sexp(doc.tree) == _fresh("python", doc.text)


def test_reparse_waits_for_a_reader():
    doc = DocumentTree("python", SOURCE)
    assert doc.tree is not None and doc.reparses == 1
    for i in range(5):
        doc.edit(len(doc.text), len(doc.text), f"x{i} = {i}\n")
    assert doc.reparses == 1  # five edits, no parse yet
    assert doc.tree is not None and doc.reparses == 2


@pytest.mark.parametrize("encoding", [8, 16, 32])
def test_lsp_ranges_in_each_encoding_land_on_the_same_characters(encoding: int):
    doc = DocumentTree("python", SOURCE)
    line = SOURCE.split("\n")[1]
    after_emoji = line.index("👋") + 1  # code points
    units = len(line[:after_emoji].encode({8: "utf-8", 16: "utf-16-le", 32: "utf-32-le"}[
        encoding])) // {8: 1, 16: 2, 32: 4}[encoding]
    doc.apply_change(Point(1, units), Point(1, units), "!", encoding)
    assert doc.text.split("\n")[1] == line[:after_emoji] + "!" + line[after_emoji:]
    assert _sexp(doc.tree) == _fresh("python", doc.text)


def test_crlf_and_lone_cr_lines_follow_the_lsp():
    doc = DocumentTree("python", "a = 1\r\nb = 2\rc = 3\n")
    doc.apply_change(Point(2, 0), Point(2, 1), "d", 16)
    assert doc.text == "a = 1\r\nb = 2\rd = 3\n"
    assert _sexp(doc.tree) == _fresh("python", doc.text)


def test_a_position_past_the_end_is_clamped():
    doc = DocumentTree("python", "a = 1\n")
    doc.apply_change(Point(0, 99), Point(7, 0), "2", 16)
    assert doc.text == "a = 12"


def test_an_edit_outside_the_text_is_refused():
    doc = DocumentTree("python", "a")
    with pytest.raises(ValueError):
        doc.edit(0, 5, "")


def test_no_grammar_or_too_large_means_no_tree_and_no_opinion():
    plain = DocumentTree(grammar_for("plaintext", "notes.txt"), "hello")
    assert plain.tree is None and kind_at(plain, 2) is None
    big = DocumentTree("python", "x = 1\n" * 100, max_bytes=100)
    assert big.tree is None and kind_at(big, 3) is None
    big.edit(0, len(big.text), "y = 2\n")  # shrinks under the limit: a tree again
    assert big.tree is not None and not big.tree.root_node.has_error


def test_grammar_names_from_language_ids_and_file_names():
    assert grammar_for("typescriptreact") == "tsx"
    assert grammar_for(None, "src/lib.rs") == "rust"
    assert grammar_for("plaintext", "a.hpp") == "cpp"
    assert grammar_for("cobol", "a.cbl") is None

"""The syntax layer on the completion path (issue 23 part B): each open document keeps its
tree in step with every edit, the cursor's kind picks the stop, and the rows shown are the ones
whose cut parses. The candidate strings below are inputs to the pick, not model output under
test; the real model's output goes through the same path in tests/e2e."""

from __future__ import annotations

import dataclasses
import random

from lsprotocol import types
from pygls.workspace.position_codec import PositionCodec

from engine.api import Candidate, CompletionResult, CompletionStats
from lsp_server.completion import CompletionService
from lsp_server.documents import LspTextDocument, take_snapshot
from lsp_server.settings import Settings
from lsp_server.syntax.document_tree import DocumentTree

UTF16 = PositionCodec(types.PositionEncodingKind.Utf16)


class NoWorker:
    ready = False


def service(**settings) -> CompletionService:
    current = Settings(**settings)
    return CompletionService(NoWorker(), lambda: current)  # type: ignore[arg-type]


def opened(text: str, language: str = "python", uri: str = "file:///t.py") -> LspTextDocument:
    document = LspTextDocument(uri, text, version=1, language_id=language, position_codec=UTF16)
    document.enable_syntax(1_000_000)
    return document


def change(document: LspTextDocument, start, end, text: str) -> None:
    document.apply_change(types.TextDocumentContentChangePartial(
        range=types.Range(start=types.Position(*start), end=types.Position(*end)), text=text))


def prepared_at(document: LspTextDocument, line: int, character: int, **settings):
    snap = take_snapshot(document, types.Position(line=line, character=character))
    return service(**settings).prepare(snap, invoked=False, selection=None, document=document)


def test_the_tree_follows_every_incremental_edit_and_full_change():
    document = opened("def f(x):\n    return x\n")
    rng = random.Random(7)
    pieces = ["(", ")", "y", "\n", "    ", "é😀", ":", "", "if a:\n    b\n"]
    for _ in range(60):  # random typing, deleting and pasting across lines
        lines = document.source.split("\n")
        line_a = rng.randrange(len(lines))
        line_b = min(len(lines) - 1, line_a + rng.randrange(2))
        col_a = rng.randrange(len(lines[line_a]) + 1)
        col_b = rng.randrange(len(lines[line_b]) + 1) if line_b > line_a else col_a
        change(document, (line_a, col_a), (line_b, col_b), rng.choice(pieces))
        assert document.syntax.text == document.source
    fresh = DocumentTree("python", document.source)
    assert str(document.syntax.tree.root_node) == str(fresh.tree.root_node)
    document.apply_change(types.TextDocumentContentChangeWholeDocument(text="x = 1\n"))
    assert document.syntax.text == "x = 1\n"
    assert str(document.syntax.tree.root_node) == str(DocumentTree("python", "x = 1\n")
                                                      .tree.root_node)


def test_a_language_without_a_grammar_gets_no_tree_and_keeps_todays_stop():
    document = opened("foo(\n", language="plaintext", uri="file:///notes.txt")
    assert document.syntax is None
    prepared = prepared_at(document, 0, 4)
    assert prepared.syntax is None and prepared.stop == "block"  # today: after an opener


def test_the_cursor_kind_picks_the_stop():
    document = opened("def f(a, b):\n    return g(a, )\n")
    prepared = prepared_at(document, 1, len("    return g(a, "))
    assert prepared.syntax.kind == "argument_list" and prepared.stop == "expr"
    assert prepared_at(document, 1, len("    return g(a, "), syntax=False).stop == "line"
    in_string = opened("x = 'hello wor'\ny = 2\n")
    assert prepared_at(in_string, 0, len("x = 'hello wor")).stop == "line"
    condition = opened("def f(a):\n    if \n        return a\n")
    prepared = prepared_at(condition, 1, len("    if "))
    assert prepared.syntax.kind == "condition" and prepared.stop == "expr"
    # An explicit stop setting wins over the kind.
    assert prepared_at(document, 1, len("    return g(a, "), stop_mode="line").stop == "line"


def test_the_view_is_the_snapshots_even_after_later_edits():
    document = opened("def f(a):\n    \n")
    prepared = prepared_at(document, 1, 4)
    change(document, (1, 4), (1, 4), "return (")
    assert prepared.syntax.before == "def f(a):\n    " and prepared.syntax.after == "\n"
    assert not prepared.syntax.tree.root_node.has_error  # the copy is of the snapshot


def rows(*texts_and_ended) -> CompletionResult:
    candidates = [Candidate(text=t, mean_confidence=c, span_length=8, ended=e)
                  for t, e, c in texts_and_ended]
    return CompletionResult(text=candidates[0].text, candidates=candidates,
                            stats=CompletionStats())


def test_only_rows_whose_cut_parses_are_shown_ranked_ended_first():
    document = opened("def f(items):\n    \n\nprint(f([]))\n")
    s = service()
    prepared = prepared_at(document, 1, 4)
    assert prepared.syntax is not None and prepared.stop == "block"
    texts = s._finish(rows(
        ("]]", True, 0.999),  # no cut of it parses: hidden
        ("return (items", True, 0.99),  # parses only cut mid-line: a fragment, no end
        ("return len(items)\n    x = )", False, 0.9),  # a whole line dropped: ended there
        ("return sum(items)", True, 0.5),  # ended and parses
    ), dataclasses.replace(prepared, candidates=4))
    assert texts == ("return len(items)", "return sum(items)", "return")
    assert s.syntax_judged == 1 and s.syntax_hidden_rows == 1


def test_nothing_is_shown_when_no_row_parses_and_today_without_an_opinion():
    document = opened("def f(items):\n    \n")
    s = service()
    prepared = prepared_at(document, 1, 4)
    assert s._finish(rows(("]]", True, 0.9), (")", True, 0.8)), prepared) == ()
    assert s.syntax_emptied == 1
    # The file is broken around the hole whatever it holds: no opinion, today's pick.
    broken = opened("def f(items:\n    \n")
    prepared = prepared_at(broken, 1, 4)
    assert s._finish(rows(("return (items", True, 0.9),), prepared) == ("return (items",)
    assert s.syntax_judged == 1  # only the first answer was judged
    # Syntax off: today's pick.
    prepared = prepared_at(document, 1, 4, syntax=False)
    assert prepared.syntax is None
    assert s._finish(rows(("]]", True, 0.9),), prepared) == ("]]",)


def test_the_expr_stop_ends_a_python_condition_at_its_colon():
    document = opened("def f(a):\n    if \n        return a\n")
    prepared = prepared_at(document, 1, len("    if "))
    texts = service()._finish(rows(("a > 0:\n        print(a)", True, 0.9),), prepared)
    assert texts == ("a > 0:",)

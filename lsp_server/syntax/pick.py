"""The syntax layer on the completion path: what a request reads from its document's tree
before the model runs (the cursor's kind, a copy of the tree), and which of the model's rows
it shows afterwards.

Shown: only rows whose SAFIM-style cut parses in the hole, ranked (ended, parses, non-empty,
confidence). When the check has an opinion and no row parses, nothing is shown: a ghost text
that breaks the file is worse than none (JetBrains Full Line's rule; docs/LOG.md, issue 23
part B). Without an opinion (no grammar, a file broken around the cursor whatever the hole
holds) the rows keep today's order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lsp_server.syntax.cursor import CursorKind, SyntaxStop, stop_for_kind
from lsp_server.syntax.document_tree import DocumentTree
from lsp_server.syntax.hole_check import HoleCheck
from lsp_server.syntax.rank import Row, cut_row, rank, sort_key


@dataclass(frozen=True)
class SyntaxView:
    """The document's syntax at the request's snapshot: valid after later edits, since the
    tree is a copy and the text the snapshot's."""

    grammar: str
    kind: CursorKind | None
    tree: object  # tree_sitter.Tree of before + after (None: the check parses them)
    before: str
    after: str

    @property
    def stop(self) -> SyntaxStop | None:
        return stop_for_kind(self.kind)


def view_at(document_tree: DocumentTree | None, text: str, offset: int) -> SyntaxView | None:
    """The view at code-point `offset`; None without a tree or when the tree is not of `text`
    (it always is when read before the request's first await)."""
    if document_tree is None or document_tree.grammar is None:
        return None
    tree = document_tree.tree
    if tree is None or document_tree.text != text:
        return None
    from lsp_server.syntax.cursor import cursor_kind

    kind = cursor_kind(tree, document_tree.source, document_tree.byte_offset(offset),
                       document_tree.grammar)
    return SyntaxView(grammar=document_tree.grammar, kind=kind, tree=tree.copy(),
                      before=text[:offset], after=text[offset:])


@dataclass(frozen=True)
class Picked:
    texts: list[str]  # best first
    opinion: bool  # the check could judge this hole
    hidden: int  # rows not shown because no cut of them parses
    checks: int  # candidate parses done


def hole_check(view: SyntaxView) -> HoleCheck:
    """The check of the view's hole (its reference parses: ~2-5 ms at 2k lines). Built while
    the model runs (the server starts it in a thread when it sends the request), so only the
    rows' own checks remain once the answer is in."""
    return HoleCheck(view.grammar, view.before, view.after, tree=view.tree)


def pick(view: SyntaxView, rows: list[Row], want: int = 1,
         check: HoleCheck | None = None, shown: Callable[[str], bool] | None = None) -> Picked:
    """Cut the rows in the hole, rank them, keep the ones that parse (see the module doc).

    Rows are cut best first by today's order (ended, confidence), and cutting stops once `want`
    rows the model ended are accepted unchanged: nothing after them can outrank them but a row
    that ran out of slots and ends at a dropped line, which is rare and not worth a check per
    row on every keystroke (each one is a parse: about 1 ms at 2k lines).

    With `shown` (whether the server would show a text), only the first `want` shown texts
    are asked for: cutting also stops once no row left could rank above the want-th of them
    (_decided), and `texts` may then hold fewer of the rest."""
    check = check if check is not None else hole_check(view)
    if not check.has_opinion:
        return Picked([row.text for row in rows], False, 0, 0)
    cut: list[Row] = []
    whole = 0
    seen: set[str] = set()
    order = sorted(rows, key=lambda r: (r.ended, r.confidence), reverse=True)
    for index, row in enumerate(order):
        key = row.text.rstrip()
        if not key.strip() or key in seen:
            continue
        if shown is not None and cut and _decided(cut, order[index:], want, shown):
            break
        seen.add(key)
        done = cut_row(row, check.truncate(row.text))
        cut.append(done)
        whole += bool(row.ended and done.parses and done.text == row.text)
        if whole >= want:
            break
    ranked, _ = rank(cut)
    texts: list[str] = []
    for row in ranked:
        if row.parses and row.text not in texts:
            texts.append(row.text)
    hidden = sum(1 for row in ranked if not row.parses)
    return Picked(texts, True, hidden, check.checks)


def _decided(cut: list[Row], left: list[Row], want: int, shown: Callable[[str], bool]) -> bool:
    """Whether the first `want` shown texts are settled by the rows cut so far: none of the
    rows `left` (cut after them, so behind them on a tie) could rank above the want-th.

    A row's cut is a head of its text, so its rank key (rank.sort_key) is at most: ended if
    the model ended it, or if a cut at one of its line breaks could end it (cut_row); parses;
    non-empty; its own confidence."""
    ranked, _ = rank(cut)
    texts: list[str] = []
    for row in ranked:
        if row.parses and row.text not in texts and shown(row.text):
            texts.append(row.text)
            if len(texts) == want:
                floor = sort_key(row)
                return all(_best_key(other) <= floor for other in left)
    return False


def _best_key(row: Row) -> tuple[bool, bool, bool, float]:
    could_end = row.ended or "\n" in row.text or "\r" in row.text
    return (could_end, True, bool(row.text.strip()), row.confidence)

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

from dataclasses import dataclass

from lsp_server.syntax.cursor import CursorKind, SyntaxStop, stop_for_kind
from lsp_server.syntax.document_tree import DocumentTree
from lsp_server.syntax.hole_check import HoleCheck
from lsp_server.syntax.rank import Row, cut_rows


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


def pick(view: SyntaxView, rows: list[Row]) -> Picked:
    """Cut every row in the hole, rank them, keep the ones that parse (see the module doc)."""
    check = HoleCheck(view.grammar, view.before, view.after, tree=view.tree)
    if not check.has_opinion:
        return Picked([row.text for row in rows], False, 0, 0)
    ranked = cut_rows(check, rows)
    texts: list[str] = []
    for row in ranked.rows:
        if row.parses and row.text not in texts:
            texts.append(row.text)
    hidden = sum(1 for row in ranked.rows if not row.parses)
    return Picked(texts, True, hidden, ranked.checks)

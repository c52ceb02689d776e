"""Syntax layer (issue 23): tree-sitter trees of open documents, the cursor's kind and the stop
mode it asks for, SAFIM-style cuts of candidates, and their ranking. Torch-free; a language
without a grammar gets no opinion (None) everywhere, and the caller keeps today's rules.

The calls the server makes (design/context.md §7.1):

    tree = DocumentTree(grammar_for(language_id, uri), text)   # didOpen
    tree.edit(start, end, new_text)                            # each didChange range
    kind = kind_at(tree, offset)                               # per request
    stop = stop_for_kind(kind)                                 # None: today's rule
    text = apply_expression_stop(raw, tree.grammar, kind)      # when stop == "expr"
    ranked = cut_rows(HoleCheck(tree.grammar, prefix, suffix), rows)
"""

from lsp_server.syntax.cursor import CursorKind, SyntaxStop, cursor_kind, stop_for_kind
from lsp_server.syntax.document_tree import DocumentTree, Point
from lsp_server.syntax.expression_stop import apply_expression_stop
from lsp_server.syntax.hole_check import Cut, HoleCheck
from lsp_server.syntax.languages import grammar_for, load_language, supported
from lsp_server.syntax.rank import Ranked, Row, cut_rows, rank


def kind_at(tree: DocumentTree, offset: int) -> CursorKind | None:
    """The cursor kind at code-point `offset` of the document; None without a tree."""
    return cursor_kind(tree.tree, tree.source, tree.byte_offset(offset), tree.grammar)


__all__ = [
    "Cut", "CursorKind", "DocumentTree", "HoleCheck", "Point", "Ranked", "Row", "SyntaxStop",
    "apply_expression_stop", "cursor_kind", "cut_rows", "grammar_for", "kind_at",
    "load_language", "rank", "stop_for_kind", "supported",
]

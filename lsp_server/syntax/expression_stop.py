"""The expression stop: a completion inside an argument list or a condition ends where the
enclosing bracket closes (the closer kept: a duplicate of the text after the cursor is trimmed
later, as for every stop), at a `:` that ends a Python condition (kept), before a `{` that
opens the body of a brace language's condition, or at the end of the line."""

from __future__ import annotations

from engine.stop import apply_stop


def apply_expression_stop(text: str, grammar: str | None, kind: str | None = None) -> str:
    """`text` up to where the expression around the cursor ends (see the module doc): the
    engine's own rule, told what only the server knows (a condition, and its language)."""
    condition = kind == "condition"
    return apply_stop(text, "expr", "", colon_ends=condition and grammar == "python",
                      brace_ends=condition and grammar != "python")

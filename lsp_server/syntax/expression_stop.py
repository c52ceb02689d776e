"""The expression stop: a completion inside an argument list or a condition ends where the
enclosing bracket closes (the closer kept: a duplicate of the text after the cursor is trimmed
later, as for every stop), at a `:` that ends a Python condition (kept), before a `{` that
opens the body of a brace language's condition, or at the end of the line."""

from __future__ import annotations

_OPENERS = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = frozenset(_OPENERS.values())
_QUOTES = frozenset("\"'`")


def apply_expression_stop(text: str, grammar: str | None, kind: str | None = None) -> str:
    """`text` up to where the expression around the cursor ends (see the module doc)."""
    depth = 0
    quote: str | None = None
    index = 0
    while index < len(text):
        char = text[index]
        if quote is not None:
            if char == "\\":
                index += 2
                continue
            if char == quote:
                quote = None
            elif char == "\n":
                return text[:index].rstrip()
            index += 1
            continue
        if char in _QUOTES:
            quote = char
        elif char == "\n" and depth == 0:
            return text[:index].rstrip()
        elif char in _OPENERS:
            if char == "{" and depth == 0 and kind == "condition" and grammar != "python":
                return text[:index].rstrip()
            depth += 1
        elif char in _CLOSERS:
            if depth == 0:
                return text[: index + 1]
            depth -= 1
        elif char == ":" and depth == 0 and kind == "condition" and grammar == "python":
            return text[: index + 1]
        index += 1
    return text

"""The cursor's kind, from the document's tree and its lines, and the stop mode it asks for.

Kinds: string, comment, empty_block_body, argument_list, condition, statement_start,
mid_expression. string/comment -> one line; an empty block body -> a block; an argument list
or a condition -> the expression stop (until the enclosing bracket or `:` closes); the others
keep today's rule (engine/stop.py), so `stop_for_kind` answers None for them.
"""

from __future__ import annotations

import re
from typing import Literal

CursorKind = Literal[
    "string",
    "comment",
    "empty_block_body",
    "argument_list",
    "condition",
    "statement_start",
    "mid_expression",
]
SyntaxStop = Literal["line", "block", "expr"]

_STRING_TYPES = frozenset({
    "string", "string_literal", "raw_string_literal", "interpreted_string_literal",
    "template_string", "char_literal", "character_literal", "text_block", "string_content",
    "concatenated_string",
})
_ARGUMENT_TYPES = frozenset({
    "argument_list", "arguments", "parameters", "formal_parameters", "parameter_list",
    "lambda_parameters", "type_arguments", "type_parameters",
})
# Containers of statements: the walk up from the cursor stops at them (a call inside a
# block's statement is an argument list; the block around it is not a condition).
_BODY_TYPES = frozenset({
    "module", "program", "source_file", "translation_unit", "block", "statement_block",
    "compound_statement", "class_body", "declaration_list", "field_declaration_list",
    "interface_body", "enum_body", "constructor_body", "switch_block", "switch_body",
})
_CONDITION_PARENTS = frozenset({
    "if_statement", "elif_clause", "while_statement", "do_statement", "if_expression",
    "while_expression", "for_statement", "conditional_expression", "ternary_expression",
})
_CONDITION_LINE = {
    "python": re.compile(r"^\s*(if|elif|while)\b(?!.*:\s*$)"),
    "go": re.compile(r"^\s*(}\s*else\s+)?(if|for)\b(?!.*\{\s*$)"),
    "rust": re.compile(r"^\s*(}\s*else\s+)?(if|while)\b(?!.*\{\s*$)"),
}
_PAREN_CONDITION = re.compile(r"^\s*(}\s*)?(else\s+)?(if|while)\s*\(")
_INDENT_LANGUAGES = frozenset({"python"})


def stop_for_kind(kind: CursorKind | None) -> SyntaxStop | None:
    """The stop mode a kind asks for; None: keep today's rule."""
    if kind in ("string", "comment"):
        return "line"
    if kind == "empty_block_body":
        return "block"
    if kind in ("argument_list", "condition"):
        return "expr"
    return None


def cursor_kind(tree, source: bytes, offset: int, grammar: str | None) -> CursorKind | None:
    """The kind of the cursor at byte `offset` of `source` (parsed as `tree`); None without a
    tree (no grammar: no opinion)."""
    if tree is None:
        return None
    line_start = source.rfind(b"\n", 0, offset) + 1
    line_end = source.find(b"\n", offset)
    line_end = len(source) if line_end == -1 else line_end
    before = source[line_start:offset].decode("utf-8", "replace")
    after = source[offset:line_end].decode("utf-8", "replace").rstrip("\r")
    node = tree.root_node.descendant_for_byte_range(max(offset - 1, 0), offset)
    ancestors = []
    while node is not None:
        ancestors.append(node)
        node = node.parent
    for node in ancestors:
        if "comment" in node.type and node.start_byte < offset and (
            offset < node.end_byte or _is_line_comment(source, node)
        ):
            return "comment"
        if node.type in _STRING_TYPES and node.start_byte < offset < node.end_byte:
            return "string"
    if _empty_block_body(source, line_start, line_end, before, after, grammar):
        return "empty_block_body"
    inner = _enclosing_expression(ancestors, offset)
    if inner is not None:
        return inner
    if _condition_by_text(before, after, grammar):
        return "condition"
    if before.count("(") > before.count(")"):  # an unclosed call being typed (error recovery)
        return "argument_list"
    if not before.strip():
        return "statement_start"
    return "mid_expression"


def _is_line_comment(source: bytes, node) -> bool:
    head = source[node.start_byte : node.start_byte + 2]
    return head.startswith(b"#") or head == b"//"


def _enclosing_expression(ancestors, offset: int) -> CursorKind | None:
    """argument_list or condition: the innermost of them around the cursor, if any before a
    statement container."""
    for child, parent in zip(ancestors, ancestors[1:], strict=False):
        if child.type in _BODY_TYPES or child.type.endswith("_body"):
            return None
        if child.type in _ARGUMENT_TYPES and child.start_byte < offset < child.end_byte:
            return "argument_list"
        if parent.type in _CONDITION_PARENTS:
            condition = parent.child_by_field_name("condition")
            if condition is not None and condition.id == child.id and (
                child.start_byte <= offset <= child.end_byte
            ):
                return "condition"
    return None


def _condition_by_text(before: str, after: str, grammar: str | None) -> bool:
    """`if |` typed with nothing after yet: the tree holds an ERROR, the line says enough."""
    rest = after.strip()
    pattern = _CONDITION_LINE.get(grammar or "")
    if pattern is not None:
        return bool(pattern.match(before)) and rest in ("", ":", "{")
    return bool(_PAREN_CONDITION.match(before)) and before.count("(") > before.count(")") and (
        rest in ("", ")", ") {", "){")
    )


def _next_code_line(source: bytes, position: int) -> str | None:
    """The next non-blank line starting at or after `position`, or None at the end."""
    while position < len(source):
        end = source.find(b"\n", position)
        end = len(source) if end == -1 else end
        line = source[position:end].decode("utf-8", "replace").rstrip("\r")
        if line.strip():
            return line
        position = end + 1
    return None


def _previous_code_line(source: bytes, line_start: int) -> str | None:
    position = line_start - 1
    while position > 0:
        start = source.rfind(b"\n", 0, position) + 1
        line = source[start:position].decode("utf-8", "replace").rstrip("\r")
        if line.strip():
            return line
        position = start - 1
    return None


def _indent(line: str) -> int:
    return len(line.expandtabs(4)) - len(line.expandtabs(4).lstrip())


def _empty_block_body(
    source: bytes, line_start: int, line_end: int, before: str, after: str, grammar: str | None
) -> bool:
    """The cursor sits where a block's body goes, and the body has nothing yet."""
    if after.strip() and not after.strip().startswith("}"):
        return False
    if before.strip():  # `{|}` or `if x:|` at the end of the opener's line
        opener = before.rstrip()
        head_indent = _indent(before)
    else:
        previous = _previous_code_line(source, line_start)
        if previous is None:
            return False
        opener = previous.rstrip()
        head_indent = _indent(previous)
    if grammar in _INDENT_LANGUAGES:
        if not opener.endswith(":") or after.strip():
            return False
        following = _next_code_line(source, line_end + 1)
        return following is None or _indent(following) <= head_indent
    if not opener.endswith("{"):
        return False
    if after.strip().startswith("}"):
        return True
    following = _next_code_line(source, line_end + 1)
    return following is not None and following.strip().startswith("}")

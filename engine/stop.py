"""Stop modes: where a completion ends (torch-free, so the LSP server can share the rules).

- line: the rest of the cursor's line (or the next line, when the cursor ends a written line)
- block: up to where the text dedents out of the cursor's block
- expr: up to where the expression around the cursor ends: the first bracket closing one
  opened before the cursor (kept), or the end of the line at bracket depth 0 (an argument list
  or a condition; the LSP server, which knows the language, also ends a Python condition at its
  `:` and a brace language's before its `{`)
- free: everything the model wrote
"""

from __future__ import annotations


def _indent(line: str) -> int:
    return len(line.expandtabs(4)) - len(line.expandtabs(4).lstrip())


BLOCK_OPENERS = (":", "{", "(", "[")  # a line ending in one of these is followed by a block


def stop_for_cursor(line_before: str, line_after: str) -> str:
    """The editor's automatic stop mode: text after the cursor -> one line; an empty line or one
    that opens a block -> a block; otherwise (end of a written line) -> the next line."""
    if line_after.strip():
        return "line"
    before = line_before.rstrip()
    if not before or before.endswith(BLOCK_OPENERS):
        return "block"
    return "line"


def stop_after_accepting(stop: str, prefix: str, suffix: str, accepted: str) -> str:
    """The stop mode of the request that follows accepting `accepted` at the cursor, for the
    engine's speculation (engine/denoise/speculation.py): when `stop` is the one the editor's
    automatic rule gives at this cursor, the request is taken as automatic and the rule is
    applied at the cursor after the accepted text; otherwise the user set `stop`, and the
    next request asks for it again. (A fixed setting that happens to agree with the rule here
    is taken as automatic: where that changes the hole, the engine also speculates beside this
    request's own hole, engine/engine.py _speculate_on.)"""
    line_after = suffix.split("\n", 1)[0]
    if stop != stop_for_cursor(prefix.rsplit("\n", 1)[-1], line_after):
        return stop
    return stop_for_cursor((prefix + accepted).rsplit("\n", 1)[-1], line_after)


_OPENERS = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = frozenset(_OPENERS.values())
_QUOTES = frozenset("\"'`")


def expression_end(text: str, *, colon_ends: bool = False, brace_ends: bool = False) -> int:
    """Where the expression around the cursor ends in `text`: just after a closer at depth 0
    (it closes a bracket opened before the cursor), or at a line break at depth 0; brackets
    and line breaks inside a quoted string do not count (a string left open ends at its line).
    The server, knowing the cursor is in a condition, also ends it just after a `:` at depth 0
    (Python) or just before a `{` at depth 0 (a brace language's body)."""
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
                return index
        elif char in _QUOTES:
            quote = char
        elif char == "\n" and depth == 0:
            return index
        elif char in _OPENERS:
            if char == "{" and depth == 0 and brace_ends:
                return index
            depth += 1
        elif char in _CLOSERS:
            if depth == 0:
                return index + 1
            depth -= 1
        elif char == ":" and depth == 0 and colon_ends:
            return index + 1
        index += 1
    return len(text)


def apply_stop(text: str, mode: str, prefix: str, *, colon_ends: bool = False,
               brace_ends: bool = False) -> str:
    """Cut a completion per stop mode: the one stop rule, applied by the engine and again by
    the LSP server (lsp_server/postprocess.py cut_at_stop) on the same terms. `prefix` is the
    text before the cursor (only its last line counts: "block"); `colon_ends`/`brace_ends`
    are the server's knowledge of a condition (see expression_end; "expr")."""
    if mode == "free":
        return text
    if mode == "expr":
        end = expression_end(text, colon_ends=colon_ends, brace_ends=brace_ends)
        return text if end == len(text) else text[:end].rstrip()
    if mode == "line":
        head, newline, rest = text.partition("\n")
        if newline and not head.strip():
            # Cursor at a line's end: the one line worth offering is the next one.
            return head + newline + rest.split("\n", 1)[0]
        return head
    if mode != "block":
        raise ValueError(f"unknown stop mode {mode!r}")
    lines = text.split("\n")
    lines_with_cursor = [prefix.rsplit("\n", 1)[-1] + lines[0], *lines[1:]]
    # The block is set by the cursor's line; if that is blank, by the first line written.
    anchor = next((i for i, ln in enumerate(lines_with_cursor) if ln.strip()), None)
    if anchor is None:
        return text
    base = _indent(lines_with_cursor[anchor])
    # A line ending in an opener is followed by a body deeper than it: the first line back at
    # its depth (the closer, or the next statement) is outside the block. The closer is the
    # document's (editors close brackets), as the server's duplicate trim assumes.
    opens_block = lines_with_cursor[anchor].rstrip().endswith(BLOCK_OPENERS)
    for i in range(anchor + 1, len(lines)):
        if not lines[i].strip():
            continue
        depth = _indent(lines[i])
        if depth < base or (opens_block and depth <= base):
            return "\n".join(lines[:i]).rstrip(" \t\n")
    return text

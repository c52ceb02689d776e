"""Stop modes: where a completion ends (torch-free, so the LSP server can share the rules).

- line: the rest of the cursor's line (or the next line, when the cursor ends a written line)
- block: up to where the text dedents out of the cursor's block
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


def apply_stop(text: str, mode: str, prefix: str) -> str:
    """Cut a completion per stop mode. `prefix` is the text before the cursor (for "block")."""
    if mode == "free":
        return text
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
    opens_block = lines_with_cursor[anchor].rstrip().endswith((":", "{"))
    for i in range(anchor + 1, len(lines)):
        if not lines[i].strip():
            continue
        depth = _indent(lines[i])
        if depth < base or (opens_block and depth <= base):
            return "\n".join(lines[:i]).rstrip(" \t\n")
    return text

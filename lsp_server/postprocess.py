"""Turn raw model text into a suggestion fit to show: one rule per function, each tested.

Order: stop rule (mid-line -> one line, empty line / after an opener -> block to the scope's
end), trim what duplicates the text after the cursor, match the file's indentation, then drop
what is not worth showing. Works on "\\n" text; the file's own line ending goes back last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.api import StopMode
from engine.stop import apply_stop, stop_for_cursor

CLOSERS = frozenset(")]}\"'`")
# Characters the model may repeat from the text after the cursor without meaning new code.
_PUNCTUATION = CLOSERS | frozenset(";:,. ")


@dataclass(frozen=True)
class CursorContext:
    """What the rules need to know about the cursor's surroundings ("\\n" line breaks)."""

    line_before: str  # the cursor line up to the cursor
    line_after: str = ""  # the cursor line after the cursor, without its line break
    next_lines: list[str] = field(default_factory=list)  # lines below the cursor line
    previous_line: str = ""  # the nearest non-blank line above the cursor line
    # non-blank lines above the cursor line, nearest last (previous_line is the last one)
    previous_lines: list[str] = field(default_factory=list)
    indent_unit: str = "    "
    eol: str = "\n"
    grammar: str | None = None  # tree-sitter grammar of the document, for the expr stop
    kind: str | None = None  # the cursor's syntax kind (lsp_server/syntax/cursor.py)


def choose_stop(context: CursorContext, setting: str) -> StopMode:
    """`auto`: text after the cursor -> one line; an empty line or after `:`/`{` -> a block."""
    if setting in ("line", "block", "expr", "free"):
        return setting  # type: ignore[return-value]
    return stop_for_cursor(context.line_before, context.line_after)  # type: ignore[return-value]


def postprocess(text: str, context: CursorContext, stop: StopMode) -> str | None:
    """The suggestion to show, or None when nothing is worth showing."""
    text = cut_at_stop(text, context, stop)
    text = trim_duplicate_suffix(text, context)
    text = trim_repetition(text)
    text = match_indentation(text, context.indent_unit, not context.line_before.strip())
    if is_useless(text, context):
        return None
    return text.replace("\n", context.eol) if context.eol != "\n" else text


def cut_at_stop(text: str, context: CursorContext, stop: StopMode) -> str:
    """The engine's stop rule (engine/stop.py apply_stop: the one copy), told what only the
    server knows: the cursor's syntax kind, for the expr stop. Then the suggestion's trailing
    whitespace goes, unless text follows the cursor on its line (a block always ends clean)."""
    if stop == "expr":
        from lsp_server.syntax.expression_stop import apply_expression_stop

        text = apply_expression_stop(text, context.grammar, context.kind)
    else:
        text = apply_stop(text, stop, context.line_before)
    return text.rstrip() if stop == "block" or not context.line_after.strip() else text


def trim_duplicate_suffix(text: str, context: CursorContext) -> str:
    """Drop what the document already has after the cursor.

    - The rest of the cursor line: a tail of the completion equal to the head of `line_after`
      (closing brackets and quotes, or the whole rest of the line).
    - The lines below: cut the completion where one of its lines repeats the next non-blank
      line of the document (the model ran into the suffix).
    """
    next_line = next((line.strip() for line in context.next_lines if line.strip()), None)
    if next_line is not None and "\n" in text:
        lines = text.split("\n")
        for index in range(1, len(lines)):
            if lines[index].strip() == next_line:
                text = "\n".join(lines[:index]).rstrip()
                break
    after = context.line_after
    if not after:
        return text
    last_line_start = text.rfind("\n") + 1
    last_line = text[last_line_start:]
    for size in range(min(len(last_line), len(after)), 0, -1):
        head = after[:size]
        if not last_line.endswith(head):
            continue
        # A partial identifier overlap ("foo" before "o + 1") is a coincidence; punctuation,
        # or the whole rest of the line written again, is a duplicate.
        if set(head) <= _PUNCTUATION or head == after.rstrip():
            return text[: len(text) - size]
    return text


def match_indentation(text: str, indent_unit: str, at_line_start: bool = False) -> str:
    """Re-indent the completion with the file's kind of indent (tabs vs spaces).

    The first line continues the cursor line, so its whitespace is indentation only when the
    cursor line holds nothing but whitespace (`at_line_start`). Space widths are left alone
    when both sides use spaces: the model sees the file and follows its width.
    """
    lines = text.split("\n")
    first = 0 if at_line_start else 1
    rest = [line for line in lines[first:] if line.strip()]
    if not rest:
        return text
    file_uses_tabs = indent_unit == "\t"
    if file_uses_tabs and any(line.startswith(" ") for line in rest):
        widths = [len(line) - len(line.lstrip(" ")) for line in rest if line.startswith(" ")]
        step = math.gcd(*widths)
        step = step if step in (2, 3, 4) else 4
    elif not file_uses_tabs and any(line.startswith("\t") for line in rest):
        step = 0
    else:
        return text
    out = lines[:first]
    for line in lines[first:]:
        body = line.lstrip(" \t")
        lead = line[: len(line) - len(body)]
        if step:  # spaces -> tabs
            levels, extra = divmod(len(lead.expandtabs(step)), step)
            lead = "\t" * levels + " " * extra
        else:  # tabs -> the file's spaces
            lead = lead.replace("\t", indent_unit)
        out.append(lead + body if body else "")
    return "\n".join(out)


REPEAT_LIMIT = 3  # the same line this many times in a row is a model stuck in a loop


def trim_repetition(text: str) -> str:
    """Cut a completion where one line starts repeating REPEAT_LIMIT+ times in a row, keeping
    the first copy: `a\nb\nb\nb\nb` -> `a\nb`."""
    lines = text.split("\n")
    run_start = 0
    for index in range(1, len(lines) + 1):
        same = index < len(lines) and lines[index].strip() and (
            lines[index].strip() == lines[run_start].strip()
        )
        if same:
            continue
        if index - run_start >= REPEAT_LIMIT:
            return "\n".join(lines[: run_start + 1]).rstrip()
        run_start = index
    return text


def is_useless(text: str, context: CursorContext) -> bool:
    """Empty or whitespace-only text, a line repeated over and over, or a copy of the line(s)
    just above the cursor."""
    if not text.strip():
        return True
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) >= 2 and len(set(lines)) == 1:
        return True
    first, *rest = text.split("\n")
    written = [line.strip() for line in [context.line_before + first, *rest] if line.strip()]
    above = [line.strip() for line in context.previous_lines or [context.previous_line]]
    above = [line for line in above if line]
    return bool(written) and len(written) <= len(above) and above[-len(written) :] == written

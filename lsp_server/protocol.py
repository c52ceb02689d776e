"""All LSP conversion in one place: suggestions -> inline items / completion items, ranges.

Ranges are in the client's negotiated units, computed only with the document's position codec.
An inline item's range starts at the cursor (or at the popup selection's start) and covers
the auto-closed characters right after the cursor that the suggestion re-writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lsprotocol import types
from pygls.workspace.position_codec import PositionCodec

from lsp_server.postprocess import CLOSERS

_BRACKET_OPENER = {")": "(", "]": "[", "}": "{"}
_WORD_TAIL = re.compile(r"[A-Za-z_0-9]*$")


@dataclass(frozen=True)
class Suggestion:
    """Text that replaces [start, end) on one line; positions in client units."""

    text: str
    start: types.Position
    end: types.Position


def cover_auto_closed(text: str, line_after: str) -> tuple[str, str]:
    """(insert_text, replaced) when the rest of the line is only auto-closed characters.

    `foo(|)` + "a, b" -> ("a, b)", ")"): the item replaces the `)` the editor inserted, so the
    ghost text shows the whole line. Closers the suggestion already writes itself are not
    added twice: `foo(|)` + "a):" -> ("a):", ")").
    """
    closers = line_after.rstrip()
    if not closers or not set(closers) <= CLOSERS or "\n" in text:
        return text, ""
    consumed = 0
    for ch in _unmatched_closers(text):
        if consumed < len(closers) and closers[consumed] == ch:
            consumed += 1
    return text + closers[consumed:], closers


def _unmatched_closers(text: str) -> list[str]:
    """Closing brackets without an opener in `text`, and quotes left open, in order."""
    stack: list[str] = []
    unmatched: list[str] = []
    for ch in text:
        if ch in "([{":
            stack.append(ch)
        elif ch in _BRACKET_OPENER:
            if stack and stack[-1] == _BRACKET_OPENER[ch]:
                stack.pop()
            else:
                unmatched.append(ch)
        elif ch in "\"'`" and text.count(ch) % 2 == 1 and ch not in unmatched:
            unmatched.append(ch)
    return unmatched


def shift(position: types.Position, text: str, codec: PositionCodec) -> types.Position:
    """`position` moved right over `text` (no line breaks), in the codec's units."""
    return types.Position(
        line=position.line, character=position.character + codec.client_num_units(text)
    )


def inline_items(suggestions: list[Suggestion]) -> list[types.InlineCompletionItem]:
    return [
        types.InlineCompletionItem(insert_text=s.text, range=types.Range(start=s.start, end=s.end))
        for s in suggestions
    ]


def completion_list(
    suggestions: list[Suggestion], line_before: str, codec: PositionCodec
) -> types.CompletionList:
    """The `textDocument/completion` fallback (Tabby's shape): one Text item per suggestion,
    labelled with the word being typed plus the first line, editing from the word's start."""
    word = _WORD_TAIL.search(line_before).group(0)  # type: ignore[union-attr]
    items = []
    for index, s in enumerate(suggestions):
        start = types.Position(
            line=s.start.line, character=s.start.character - codec.client_num_units(word)
        )
        new_text = word + s.text
        label = new_text.split("\n", 1)[0].strip() or new_text.strip()
        items.append(
            types.CompletionItem(
                label=label,
                kind=types.CompletionItemKind.Text,
                detail="maskfill",
                documentation=types.MarkupContent(kind=types.MarkupKind.PlainText, value=new_text),
                filter_text=new_text,
                sort_text=f"0{index}",
                text_edit=types.TextEdit(
                    range=types.Range(start=start, end=s.end), new_text=new_text
                ),
            )
        )
    return types.CompletionList(is_incomplete=True, items=items)


def client_has_inline_completion(capabilities: types.ClientCapabilities | None) -> bool:
    document = capabilities.text_document if capabilities else None
    return document is not None and document.inline_completion is not None

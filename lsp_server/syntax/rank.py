"""Rank a request's rows (the engine's hole lengths, the manual trigger's samples) after the
syntax cut: ended first (today's rule), then those the cut made parse, then non-empty ones,
then confidence. A row whose cut leaves nothing is dropped and counted: parsing only when
empty is no signal (design/context.md §7.1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lsp_server.syntax.hole_check import Cut, HoleCheck


@dataclass(frozen=True)
class Row:
    text: str  # after the stop mode's cut
    ended: bool  # an end token (or the stop mode) closed it before its last slot
    confidence: float  # mean probability of the tokens the model committed
    parses: bool | None = None  # filled by cut_rows: True, False, None (no opinion)
    lines_dropped: int = 0


@dataclass(frozen=True)
class Ranked:
    rows: list[Row]  # best first
    dropped_empty: int  # rows whose cut left nothing
    checks: int  # candidate parses done


def sort_key(row: Row) -> tuple[bool, bool, bool, float]:
    return (row.ended, row.parses is True, bool(row.text.strip()), row.confidence)


def rank(rows: Sequence[Row]) -> tuple[list[Row], int]:
    """`rows` best first, without the empty ones; and how many were empty."""
    kept = [row for row in rows if row.text.strip()]
    return sorted(kept, key=sort_key, reverse=True), len(rows) - len(kept)


def cut_rows(check: HoleCheck, rows: Sequence[Row]) -> Ranked:
    """SAFIM-cut every row's text in the hole `check` describes, then rank them. Identical
    texts are cut once."""
    cuts: dict[str, Cut] = {}
    out = []
    for row in rows:
        cut = cuts.get(row.text)
        if cut is None:
            cut = cuts[row.text] = check.truncate(row.text)
        out.append(cut_row(row, cut))
    ranked, dropped = rank(out)
    return Ranked(rows=ranked, dropped_empty=dropped, checks=check.checks)


def cut_row(row: Row, cut: Cut) -> Row:
    """`row` after its cut, with its end re-judged:

    A cut that dropped whole lines closed the row: it counts as its end, as the engine counts
    its stop's cut. A cut inside a line leaves a fragment of a row that ran out of slots
    (`return n % 2` of `return n % 2 =`): it is no end, and must not outrank a row the model
    ended itself; nor does a row the model ended whose end had to be cut off mid-line
    (`return` of `return (items`) end where the model ended it."""
    fragment = cut.text != row.text and not _at_line_break(row.text, cut.text)
    ended = (row.ended and not fragment) or (cut.parses is True and cut.text != row.text
                                             and not fragment)
    return Row(text=cut.text, ended=ended, confidence=row.confidence, parses=cut.parses,
               lines_dropped=cut.lines_dropped)


def _at_line_break(text: str, cut: str) -> bool:
    """Whether `cut` (a head of `text`) ends where one of text's lines ends."""
    return cut.endswith("\n") or text[len(cut) : len(cut) + 1] in ("\n", "\r")

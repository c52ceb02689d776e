"""Identifier sets of lines and windows, for Jaccard similarity (Copilot's and Cody's measure).

A line's set is cached by its text, so after a keystroke only the edited line is split again.
"""

from __future__ import annotations

import re
from functools import lru_cache

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EMPTY: frozenset[str] = frozenset()


@lru_cache(maxsize=1 << 17)
def line_identifiers(line: str) -> frozenset[str]:
    found = _IDENTIFIER.findall(line)
    return frozenset(found) if found else _EMPTY


def identifiers(lines: list[str]) -> frozenset[str]:
    if not lines:
        return _EMPTY
    return frozenset().union(*map(line_identifiers, lines))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a or not b:
        return 0.0
    common = len(a & b)
    return common / (len(a) + len(b) - common)

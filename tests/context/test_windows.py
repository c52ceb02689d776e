"""The window index's vectorised Jaccard, and its windows updated only where a new version's
lines changed, give the windows and scores a plain set computation gives."""

from __future__ import annotations

import random

from lsp_server.context.identifiers import identifiers, jaccard
from lsp_server.context.python_imports import parse_imports, scan_imports
from lsp_server.context.windows import (
    NEAR_DUPLICATE,
    STRIDE_LINES,
    TARGET_LINES,
    WINDOW_LINES,
    WindowIndex,
)

WORDS = ["alpha", "beta", "gamma", "delta", "self", "value", "count", "items", "parse",
         "header", "token", "index", "result", "return", "for", "in", "if", "x", "y", "z"]


def _file(rng: random.Random, lines: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) + str(rng.randrange(3)) * rng.randrange(2)
                     for _ in range(rng.randrange(0, 7))) for _ in range(lines)]


def _reference(target_lines, files, own):
    """Every window scored with frozensets, as the index did before it used arrays."""
    target = identifiers(target_lines[-TARGET_LINES:])
    best = []
    for key, lines in files:
        starts = range(0, max(1, len(lines) - WINDOW_LINES + STRIDE_LINES), STRIDE_LINES)
        found = None
        for start in starts:
            end = min(start + WINDOW_LINES, len(lines))
            if own is not None and key == own[0] and start <= own[2] and end > own[1]:
                continue
            score = jaccard(target, identifiers(lines[start:end]))
            if 0 < score < NEAR_DUPLICATE and (found is None or score > found[0]):
                found = (score, start, end)
        if found is not None:
            best.append((found[0], key, found[1], found[2]))
    best.sort(key=lambda item: (-item[0], item[1], item[2]))
    return best[:4]


def _ranked(index, target, files, versions, own):
    getters = [(key, versions[key], lambda lines=lines: "\n".join(lines))
               for key, lines in files]
    return [(s.score, s.window.key, s.window.start, s.window.end)
            for s in index.best(target, getters, own)]


def test_scores_match_plain_sets_across_edits():
    rng = random.Random(7)
    files = [(f"file://{i}.py", _file(rng, rng.choice([5, 59, 61, 200, 437]))) for i in range(6)]
    versions = {key: 1 for key, _ in files}
    index = WindowIndex()
    for round_ in range(40):
        target = _file(rng, 70)
        own = (files[0][0], 10, 90) if round_ % 2 else None
        assert _ranked(index, target, files, versions, own) == _reference(target, files, own)
        # Edit one file the way an editor does: a character, a line added, lines removed.
        which = rng.randrange(len(files))
        key, lines = files[which]
        lines = list(lines)
        at = rng.randrange(len(lines))
        kind = round_ % 3
        if kind == 0:
            lines[at] = lines[at] + " " + rng.choice(WORDS) + "9"
        elif kind == 1:
            lines.insert(at, "brand_new_name " + rng.choice(WORDS))
        else:
            del lines[at : at + 3]
            lines = lines or [""]
        files[which] = (key, lines)
        versions[key] += 1


def test_unchanged_windows_are_kept_on_a_new_version():
    rng = random.Random(3)
    lines = _file(rng, 400)
    index = WindowIndex()
    first = index.index("k", 1, lambda: "\n".join(lines))
    lines[200] += " changed_here"
    second = index.index("k", 2, lambda: "\n".join(lines))
    kept = [a is b for a, b in zip(first.window_ids, second.window_ids, strict=True)]
    touched = [i for i, same in enumerate(kept) if not same]
    assert touched == [5, 6]  # the two windows holding line 200 (starts 150 and 180)


def test_import_scan_gives_the_same_imports_and_first_uses():
    lines = [
        "import os, sys as system",
        "from a.b import (c,",
        "    d as e)  # import f",
        "from .rel import g",
        "x = c(1)",
        "from h import i",
        "print(g, e)",
    ]
    scan = scan_imports(lines)
    assert scan.imports == parse_imports(lines)
    assert set(scan.imports) == {"os", "system", "c", "e", "g", "i"}
    # "i" is never used; lines starting an import are skipped, a continuation line is not
    # (as the per-cursor scan before it did)
    assert scan.first_use == {"e": 2, "c": 4, "g": 6}

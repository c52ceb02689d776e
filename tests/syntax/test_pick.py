"""The pick on the completion path asks only for the texts the server shows (issue 23's server
overhead): it must show exactly what cutting every row would show, with fewer parses. The row
strings below are inputs to the pick, not model output under test."""

from __future__ import annotations

import random

from lsp_server.syntax import HoleCheck, Row
from lsp_server.syntax.pick import SyntaxView, pick

# (before, after) holes in files of a few shapes: a body, mid-expression, a call's arguments.
HOLES = [
    ("def f(items):\n    ", "\n\nprint(f([]))\n"),
    ("def f(a, b):\n    return a ", "\n"),
    ("import os\n\nx = os.path.join(", ")\ny = 2\n"),
    ("class A:\n    def m(self):\n        ", "\n\n    def n(self):\n        pass\n"),
]
POOL = [
    "return len(items)", "return (items", "]]", ")", "x = )", "a, b", "+ b", "- 1\n",
    "return sum(items)\n    x = )", "'a', 'b'", "pass\n        return 1", "self.x = 1\n",
    "if a:\n        b = 1", "for x in items:\n        print(x)\n    )", "\"\"\"doc", "+ (b",
]


def view_of(before: str, after: str) -> SyntaxView:
    return SyntaxView(grammar="python", kind=None, tree=None, before=before, after=after)


def every_row_then_shown(view: SyntaxView, rows: list[Row], want: int, shown) -> list[str]:
    """What the server showed before: every row (up to the want-ended rule) cut, then the
    shown texts filtered out of all of them."""
    texts = pick(view, rows, want=want).texts
    return [text for text in texts if shown(text)][:want]


def test_the_lazy_pick_shows_what_cutting_every_row_shows():
    rng = random.Random(23)
    saved = 0
    for trial in range(120):
        before, after = HOLES[trial % len(HOLES)]
        view = view_of(before, after)
        rows = [Row(rng.choice(POOL), ended=rng.random() < 0.5,
                    confidence=round(rng.random(), 2)) for _ in range(rng.randint(1, 5))]
        want = rng.choice((1, 1, 3))
        banned = rng.choice(("", "return", "a"))  # some texts the server would not show

        def shown(text: str, banned=banned) -> bool:
            return not banned or not text.startswith(banned)

        every = HoleCheck("python", before, after)
        expected = every_row_then_shown(view, rows, want, shown)
        lazy = HoleCheck("python", before, after)
        picked = pick(view, rows, want=want, check=lazy, shown=shown)
        assert [t for t in picked.texts if shown(t)][:want] == expected, (rows, want, banned)
        pick(view, rows, want=want, check=every)
        assert lazy.checks <= every.checks
        saved += every.checks - lazy.checks
    assert saved > 0  # the point of it: some rows were never cut


def test_a_row_that_could_still_end_at_a_line_break_is_cut():
    """A row the model did not end outranks an ended one once a cut drops its last line: the
    lazy pick must cut it even when the ended row parses and has the higher confidence."""
    before, after = HOLES[0]
    view = view_of(before, after)
    rows = [
        Row("return (items", ended=True, confidence=0.9),  # parses only as a fragment
        Row("return len(items)\n    x = )", ended=False, confidence=0.5),
    ]
    picked = pick(view, rows, want=1, check=HoleCheck("python", before, after),
                  shown=lambda text: True)
    assert picked.texts[0] == "return len(items)"

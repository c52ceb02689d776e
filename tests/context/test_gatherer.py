"""Context gatherer: Jaccard windows, import definitions inside the workspace only, recent
edits, the token budget, and a block that stays byte-identical between keystrokes."""

from __future__ import annotations

import json
import os

from lsp_server.context import ContextGatherer, StableContext, extra_context_tokens
from lsp_server.context.snippet import ContextBlock, Snippet

SHAPES = '''\
import math
from dataclasses import dataclass


@dataclass
class Circle:
    """A circle of a given radius."""

    radius: float
    label: str = "circle"

    def area(self) -> float:
        return math.pi * self.radius**2

    def scaled(self, factor: float) -> "Circle":
        return Circle(self.radius * factor, self.label)


def total_area(shapes: list[Circle]) -> float:
    """The summed area of `shapes`."""
    return sum(shape.area() for shape in shapes)
'''

MAIN = '''\
from geometry.shapes import Circle, total_area


def report(radii):
    circles = [Circle(r) for r in radii]
    return total_area(circles)
'''


def _filler(name: str, lines: int, words: str) -> str:
    return "\n".join(f"{name}_{i} = {words} + {i}" for i in range(lines)) + "\n"


def test_import_definitions_give_signature_lines(workspace, clock):
    workspace.write("geometry/__init__.py", "")
    workspace.write("geometry/shapes.py", SHAPES)
    doc = workspace.open("app/main.py", MAIN)
    gatherer = ContextGatherer([workspace.root], workspace.documents, clock)
    block = gatherer.gather(doc.uri, doc.source, len(doc.source), 1000)
    imports = {s.why: s for s in block.snippets if s.why.startswith("import:")}
    assert set(imports) == {"import:Circle", "import:total_area"}
    circle = imports["import:Circle"]
    assert circle.path == "geometry/shapes.py" and circle.start_line == 5
    assert circle.text.splitlines()[:4] == [
        "@dataclass", "class Circle:", '    """A circle of a given radius."""', "    radius: float",
    ]
    assert "    def scaled(self, factor: float) -> \"Circle\":" in circle.text
    assert "return" not in circle.text  # signatures, not bodies
    assert imports["import:total_area"].text == (
        "def total_area(shapes: list[Circle]) -> float:\n"
        '    """The summed area of `shapes`."""'
    )


def test_imports_resolve_inside_the_workspace_only(workspace, clock, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secrets_mod.py").write_text("def leaked_key():\n    return 'x'\n")
    (outside / "pkgout").mkdir()
    (outside / "pkgout" / "__init__.py").write_text("def beyond():\n    pass\n")
    # A symlink inside the workspace pointing out of it, and one pointing within it.
    os.symlink(outside / "secrets_mod.py", workspace.root / "secrets_mod.py")
    workspace.write("real_mod.py", "def inside_fn(a, b):\n    return a\n")
    os.symlink(workspace.root / "real_mod.py", workspace.root / "alias_mod.py")
    text = (
        "from secrets_mod import leaked_key\n"
        "from ..outside.pkgout import beyond\n"  # relative import climbing out of the root
        "from alias_mod import inside_fn\n"
        "leaked_key(); beyond(); inside_fn(1, 2)\n"
    )
    doc = workspace.open("main.py", text)
    gatherer = ContextGatherer([workspace.root], workspace.documents, clock)
    block = gatherer.gather(doc.uri, doc.source, len(doc.source), 1000)
    whys = {s.why for s in block.snippets}
    assert "import:inside_fn" in whys
    assert "import:leaked_key" not in whys and "import:beyond" not in whys
    assert all("leaked" not in s.text and "beyond" not in s.text for s in block.snippets)
    assert gatherer.files.read(workspace.root / "secrets_mod.py") is None
    assert gatherer.files.read(outside / "secrets_mod.py") is None


def test_windows_are_ranked_by_jaccard_one_per_file(workspace, clock):
    related = _filler("noise", 70, "alpha") + (
        "def parse_header(stream, header_size, checksum):\n"
        "    block = stream.read(header_size)\n"
        "    return verify(block, checksum)\n"
    ) + _filler("more", 70, "alpha")
    unrelated = _filler("other", 150, "beta")
    workspace.open("related.py", related)
    workspace.open("unrelated.py", unrelated)
    workspace.open("notes.txt", "stream header_size checksum " * 20, language="plaintext")
    cursor_text = "def read_all(stream, header_size, checksum):\n    block = stream.read("
    doc = workspace.open("current.py", cursor_text)
    gatherer = ContextGatherer([workspace.root], workspace.documents, clock)
    block = gatherer.gather(doc.uri, doc.source, len(doc.source), 4000)
    windows = [s for s in block.snippets if s.why.startswith("window:")]
    assert windows and windows[0].path == "related.py"
    assert "parse_header" in windows[0].text
    assert len({s.path for s in windows}) == len(windows)  # at most one per file
    assert all(s.path != "notes.txt" for s in windows)  # same language only
    assert all(s.path != "current.py" for s in windows)  # its own context is in the prompt
    scores = [float(s.why.split(":")[1]) for s in windows]
    assert scores == sorted(scores, reverse=True)


def test_budget_is_kept_and_zero_means_nothing(workspace, clock):
    workspace.write("geometry/__init__.py", "")
    workspace.write("geometry/shapes.py", SHAPES)
    workspace.open("geometry/shapes.py")
    doc = workspace.open("main.py", MAIN)
    gatherer = ContextGatherer([workspace.root], workspace.documents, clock)
    assert gatherer.gather(doc.uri, doc.source, len(doc.source), 0).snippets == ()
    for budget in (30, 60, 120, 400):
        block = gatherer.gather(doc.uri, doc.source, len(doc.source), budget)
        assert 0 < block.tokens <= budget
        assert block.tokens == sum(s.tokens for s in block.snippets)
    small = gatherer.gather(doc.uri, doc.source, len(doc.source), 60)
    assert all(s.why.startswith("import:") for s in small.snippets)  # imports come first


def test_default_budget_leaves_small_windows_out():
    assert extra_context_tokens(1024, 384, 32, 4) == 0  # the embedded model
    assert extra_context_tokens(1024, 4096, 32, 4) == 256
    assert extra_context_tokens(1024, 1200, 32, 4) == 48
    assert extra_context_tokens(1024, 1024, 64, 4) == 0


def test_recent_edits_elsewhere_are_offered(workspace, clock):
    other = workspace.open("other.py", _filler("x", 100, "gamma"))
    doc = workspace.open("main.py", "import os\n\nvalue = os.getcwd()\n")
    gatherer = ContextGatherer([workspace.root], workspace.documents, clock)
    gatherer.edited(other.uri, 50)
    clock.now += 5
    block = gatherer.gather(doc.uri, doc.source, len(doc.source), 2000)
    recent = [s for s in block.snippets if s.why == "recent_edit"]
    assert recent and recent[0].path == "other.py"
    assert (recent[0].start_line, recent[0].end_line) == (46, 56)
    clock.now += 300  # two minutes later it is no longer recent
    block = gatherer.gather(doc.uri, doc.source, len(doc.source), 2000)
    assert not [s for s in block.snippets if s.why == "recent_edit"]


def test_block_is_byte_identical_between_keystrokes(workspace, clock):
    workspace.write("geometry/__init__.py", "")
    workspace.write("geometry/shapes.py", SHAPES)
    workspace.open("geometry/shapes.py")
    body = MAIN + "".join(f"\nvalue_{i} = report([{i}])" for i in range(80)) + "\n"
    doc = workspace.open("main.py", body)
    gatherer = ContextGatherer([workspace.root], workspace.documents, clock)
    stable = StableContext(gatherer)
    cursor = doc.source.index("return total_area") + len("return total_area")

    def request(offset):
        clock.now += 0.2  # typing speed: never idle for a second
        block, changed = stable.current(doc.uri, doc.source, offset, 400)
        return block.to_json(), changed

    first, changed = request(cursor)
    assert changed and json.loads(first)["snippets"]
    for typed in "(circles) + 1":
        workspace.type_text(doc, cursor, typed)
        gatherer.edited(doc.uri, doc.source.count("\n", 0, cursor))
        stable.activity()
        cursor += 1
        again, changed = request(cursor)
        assert again == first and not changed
    assert stable.gathers == 1

    # Far away (more than 32 lines): gathered again.
    far = doc.source.index("value_70")
    request(far)
    assert stable.gathers == 2
    # Back near, then a document opens: gathered again.
    request(cursor)
    gathers = stable.gathers
    workspace.open("extra.py", "def helper():\n    pass\n")
    gatherer.opened(next(reversed(workspace.docs)))
    request(cursor)
    assert stable.gathers == gathers + 1
    # Saved: gathered again; idle for a second: gathered again.
    gatherer.saved(doc.uri)
    request(cursor)
    assert stable.gathers == gathers + 2
    assert stable.idle_in() > 0  # the server waits this long before re-gathering
    clock.now += 1.5
    assert stable.idle_in() == 0
    request(cursor)
    assert stable.gathers == gathers + 3


def test_time_budget_skips_the_later_sources(workspace, clock):
    workspace.write("geometry/__init__.py", "")
    workspace.write("geometry/shapes.py", SHAPES)
    workspace.open("geometry/shapes.py")
    doc = workspace.open("main.py", MAIN)
    gatherer = ContextGatherer([workspace.root], workspace.documents, clock, time_budget_ms=0.0)
    gatherer.edited(workspace.open("other.py", _filler("y", 40, "delta")).uri, 10)
    block = gatherer.gather(doc.uri, doc.source, len(doc.source), 2000)
    assert {s.why.split(":")[0] for s in block.snippets} == {"import"}
    assert gatherer.out_of_time == 2  # windows and recent edits skipped


def test_out_of_time_files_are_indexed_over_later_requests(workspace):
    class Ticking:  # every reading of the clock is a millisecond later
        now = 0.0

        def __call__(self):
            self.now += 0.001
            return self.now

    for i in range(8):
        workspace.open(f"mod{i}.py", _filler(f"v{i}", 200, "alpha"))
    doc = workspace.open("main.py", "x = alpha + 1\n")
    gatherer = ContextGatherer([workspace.root], workspace.documents, Ticking(),
                               time_budget_ms=4.0)
    indexed = []
    for _ in range(6):
        gatherer.gather(doc.uri, doc.source, len(doc.source), 2000)
        indexed.append(len(gatherer._windows._files))
    assert 0 < indexed[0] < 9  # the first request did not index every open file
    assert indexed == sorted(indexed) and indexed[-1] == 9  # later ones caught up


def test_a_re_gathered_block_that_differs_only_in_its_scores_is_unchanged(workspace, clock):
    """The block counts as changed only when what reaches the prompt (each snippet's path and
    text) changed: the same window ranked 0.21 instead of 0.20 sends the same chunks, so it
    must not be counted as a change nor pre-warmed (the keystroke replay saw 5 such
    "changes" in 31 requests, none of them visible to the engine)."""
    doc = workspace.open("main.py", MAIN)
    gatherer = ContextGatherer([workspace.root], workspace.documents, clock)
    scores = iter(["window:0.20", "window:0.21", "window:0.21"])

    def gather(*args, **kwargs):
        snippet = Snippet("geometry/shapes.py", "def area(shape):\n    return 0", 1, 2,
                          next(scores))
        return ContextBlock(snippets=(snippet,), tokens=snippet.tokens)

    gatherer.gather = gather
    stable = StableContext(gatherer)
    first, changed = stable.current(doc.uri, doc.source, 0, 400)
    assert changed and stable.changes == 1
    clock.now += 1.5  # idle: gathered again, the same text ranked anew
    block, changed = stable.current(doc.uri, doc.source, 0, 400)
    assert not changed and block is first and stable.changes == 1 and stable.gathers == 2

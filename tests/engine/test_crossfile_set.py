"""The shipped cross-file set: held-out packages with their licences, holes that match their
files, oracles in another file; and CrossCodeEval's scores."""

from __future__ import annotations

import gzip
import json

import pytest

from engine.eval.crossfile import (
    SET_DIR,
    comment_block,
    edit_similarity,
    exact_match,
    identifier_scores,
    layout_prompt,
    load_set,
    summarize,
)


@pytest.fixture(scope="module")
def data():
    return load_set()


def test_packages_are_held_out_of_the_training_corpus_and_licensed(data):
    manifest = json.loads((SET_DIR / "MANIFEST.json").read_text())
    corpus = SET_DIR.parents[2] / "model" / "embedded" / "corpus.json.gz"
    with gzip.open(corpus, "rt") as fh:
        trained = {f[0].split("/")[1] for f in json.load(fh)["files"]
                   if f[0].startswith("site-packages/")}
    packages = {p["package"] for p in manifest["packages"]}
    assert packages == set(data.files) and len(packages) >= 5
    for package in packages:
        tops = {path.split("/")[0].removesuffix(".py") for path in data.files[package]}
        assert not tops & trained, package
        licences = list((SET_DIR / "LICENSES" / package).iterdir())
        assert licences and all(p.stat().st_size > 100 for p in licences), package
    assert manifest["items"] == len(data.items) >= 300


def test_every_hole_is_a_cross_file_use_to_the_end_of_its_line(data):
    for item in data.items:
        prefix, suffix = data.hole(item)  # asserts the reference is where the item says
        assert suffix[:1] in ("", "\n", "\r") or suffix[:1].isspace()  # the line's end
        assert "\n" not in item.reference and item.reference.strip()
        assert item.oracle != item.path and item.oracle in data.files[item.package]
        oracle_line = data.files[item.package][item.oracle].split("\n")[item.oracle_line - 1]
        assert oracle_line[:1].strip(), oracle_line  # a top-level definition (maybe aliased)
        assert item.reference.startswith(item.name.split(".")[-1])
    assert len({item.task_id for item in data.items}) == len(data.items)


def test_scores():
    assert exact_match("  foo(a, b)\nmore", "foo(a, b)")
    assert not exact_match("foo(a)", "foo(a, b)")
    assert edit_similarity("abcd", "abcd") == 1.0
    assert edit_similarity("abcd", "abed") == 0.75
    assert edit_similarity("", "abcd") == 0.0
    assert identifier_scores("foo(bar, x)", "foo(bar, x)") == (True, 1.0)
    em, f1 = identifier_scores("foo(bar)", "foo(bar, baz)")
    assert not em and f1 == pytest.approx(0.8)
    summary = summarize([])
    assert summary["tasks"] == 0 and summary["exact_match"] is None


def test_layout_keeps_the_extra_block_within_the_window():
    extra = [("pkg/a.py", "def f(x):\n    return x")]
    prefix, suffix = layout_prompt("line\n" * 1000 + "y = ", "\nz\n" * 500, extra, 384, 32)
    assert prefix.startswith(comment_block(extra))
    assert "# Compare this snippet from pkg/a.py:\n# def f(x):\n#     return x\n" in prefix
    assert prefix.endswith("y = ")
    assert len(prefix) + len(suffix) <= (384 - 32) * 3

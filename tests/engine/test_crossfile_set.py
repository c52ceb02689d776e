"""The shipped cross-file set: held-out packages with their licences, holes that match their
files, oracles in another file; and CrossCodeEval's scores."""

from __future__ import annotations

import gzip
import json

import pytest

from engine.eval import harness
from engine.eval.crossfile import (
    CONDITIONS,
    CONTEXT_BUDGETS,
    SET_DIR,
    edit_similarity,
    exact_match,
    identifier_scores,
    load_contexts,
    load_set,
    pick_budget,
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


def test_every_item_has_its_stored_context_per_condition_and_budget(data):
    contexts = load_contexts()
    assert set(contexts) == {(i.task_id, b) for i in data.items for b in CONTEXT_BUDGETS}
    for (task_id, _), conditions in contexts.items():
        assert set(conditions) == set(CONDITIONS[1:]), task_id
    # the oracle condition carries the defining file; some items find context in every source
    for item in data.items[::50]:
        assert contexts[item.task_id, 128]["oracle"][0].path == item.oracle
    for condition in ("windows", "imports", "both"):
        assert sum(bool(contexts[i.task_id, 512][condition]) for i in data.items) > 100


def test_the_budget_is_the_largest_within_half_the_context():
    assert pick_budget(384, 32, (128, 512)) == 128
    assert pick_budget(4096, 32, (128, 512)) == 512
    assert pick_budget(200, 32, (128, 512)) == 128  # none fits: the smallest


def test_the_suite_runs_every_condition_through_the_engine(memorized_model, capsys,
                                                         monkeypatch):
    """`python -m engine.eval --suite crossfile-py` on 3 items with a tiny model: each
    condition scored, the stored context sent in the request's `extra` field (never pasted
    into the prefix), a table then one JSON line."""
    from engine.engine import Engine

    sent = []
    complete = Engine.complete

    def recording(self, request, *args, **kwargs):
        sent.append(request)
        return complete(self, request, *args, **kwargs)

    monkeypatch.setattr(Engine, "complete", recording)
    record = harness.run(harness.parse_args(["--suite", "crossfile-py", "--model",
                                             str(memorized_model), "--limit", "3",
                                             "--threads", "1"]))
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == record
    assert any(line.startswith("oracle") for line in out)
    assert record["suite"] == "crossfile-py" and record["extra_budget_tokens"] in CONTEXT_BUDGETS
    assert list(record["conditions"]) == list(CONDITIONS)
    for summary in record["conditions"].values():
        assert summary["tasks"] == 3
        assert 0.0 <= summary["edit_similarity"] <= 1.0
    assert len(sent) == 3 * len(CONDITIONS)
    contexts, budget = load_contexts(), record["extra_budget_tokens"]
    items = [harness_item for harness_item in load_set().items]
    picked = [items[i * len(items) // 3] for i in range(3)]
    for n, condition in enumerate(CONDITIONS):
        for item, request in zip(picked, sent[3 * n : 3 * n + 3], strict=True):
            wanted = () if condition == "none" else contexts[item.task_id, budget][condition]
            assert request.extra == wanted, (condition, item.task_id)
            assert "Compare this snippet" not in request.prefix
    assert any(r.extra for r in sent)

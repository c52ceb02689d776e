"""Golden cases of the syntax layer, one TOML file per language (golden/README.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lsp_server.syntax import (
    DocumentTree,
    HoleCheck,
    apply_expression_stop,
    kind_at,
    load_language,
    stop_for_kind,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI (the dev extra installs it there)
    import tomli as tomllib

GOLDEN = Path(__file__).parent / "golden"
HOLE = "⟦⟧"
LANGUAGES = ("python", "javascript", "typescript", "tsx", "go", "rust", "java", "c", "cpp")


def _cases():
    for path in sorted(GOLDEN.glob("*.toml")):
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        for case in data["case"]:
            yield pytest.param(data["language"], case, id=f"{path.stem}: {case['name']}")


def test_every_language_has_goldens_and_a_grammar():
    files = {path.stem for path in GOLDEN.glob("*.toml")}
    assert set(LANGUAGES) <= files
    for language in LANGUAGES:
        assert load_language(language) is not None, language


@pytest.mark.parametrize(("language", "case"), list(_cases()))
def test_golden(language: str, case: dict):
    document = case["document"].lstrip("\n")
    assert document.count(HOLE) == 1, "one hole per case"
    offset = document.index(HOLE)
    before, after = document[:offset], document[offset + len(HOLE) :]
    tree = DocumentTree(language, before + after)
    kind = kind_at(tree, offset)
    if "kind" in case:
        assert kind == case["kind"]
    if "stop" in case:
        assert (stop_for_kind(kind) or "rule") == case["stop"]
    if "candidate" in case:
        cut = HoleCheck(language, before, after).truncate(case["candidate"])
        assert (cut.text, cut.parses) == (case["cut"], case["parses"])
    if "expr_input" in case:
        assert apply_expression_stop(case["expr_input"], language, kind) == case["expr_output"]

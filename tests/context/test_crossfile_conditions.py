"""The cross-file set's context conditions, built with the server's gatherer."""

from __future__ import annotations

import pytest

from engine.eval.crossfile import CONDITIONS, load_set
from lsp_server.context.crossfile import ConditionContext
from lsp_server.context.snippet import estimate_tokens


@pytest.fixture(scope="module")
def data():
    return load_set()


def _item(data, package, path, name):
    return next(i for i in data.items
                if (i.package, i.path, i.name) == (package, path, name))


def test_conditions_stay_in_budget_and_never_show_the_hole(data, tmp_path):
    context = ConditionContext(data, 200, tmp_path)
    for item in data.items[::37]:
        for condition in CONDITIONS:
            extra = context.extra_for(item, condition)
            if condition == "none":
                assert extra == []
                continue
            assert sum(estimate_tokens(text) + 8 for _, text in extra) <= 200
            prefix, _ = data.hole(item)
            own_line = prefix.rsplit("\n", 1)[-1] + item.reference
            for path, text in extra:
                assert not (path == item.path and own_line in text), (item.task_id, condition)


def test_imports_and_oracle_carry_the_definition(data, tmp_path):
    item = _item(data, "sqlparse", "sqlparse/lexer.py", "consume")
    context = ConditionContext(data, 256, tmp_path)
    imports = context.extra_for(item, "imports")
    assert ("sqlparse/utils.py", "def consume(iterator, n):\n"
            '    """Advance the iterator n-steps ahead. If n is none, consume entirely."""'
            ) in imports
    oracle = context.extra_for(item, "oracle")
    assert oracle[0][0] == "sqlparse/utils.py" and "def consume(iterator, n):" in oracle[0][1]
    both = context.extra_for(item, "both")
    assert both[: len(imports)] == imports  # import definitions first, then windows
    windows = context.extra_for(item, "windows")
    assert windows and all(path.startswith("sqlparse/") for path, _ in windows)

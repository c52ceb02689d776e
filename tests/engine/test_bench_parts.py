"""The bench's parts run as processes (engine/bench/json_part.py, suite.run_part): a part that
fails says which command and why, and the bench reports it and goes on."""

from __future__ import annotations

import sys

import pytest

from engine.bench.json_part import BenchPartFailed, run_json_part
from engine.bench.suite import run_part


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_the_last_line_is_the_figures_and_the_lines_before_it_are_returned():
    figures, before = run_json_part(python("print('table'); print('{\"a\": 1}')"))
    assert figures == {"a": 1} and before == ["table"]


@pytest.mark.parametrize(("code", "says"), [
    ("print('{\"a\": 1}'); print('done')", "ended without a JSON line (last line: done)"),
    ("pass", "(no output)"),
    ("print('[1, 2]')", "ended without a JSON line"),
    ("import sys; print('broken', file=sys.stderr); sys.exit(3)", "exited with 3: broken"),
])
def test_a_part_that_gives_no_figures_is_a_clear_error_naming_its_command(code, says):
    with pytest.raises(BenchPartFailed) as failed:
        run_json_part(python(code))
    assert says in str(failed.value) and code in str(failed.value)


def test_a_part_past_its_time_is_a_clear_error():
    with pytest.raises(BenchPartFailed, match="did not finish within 1 s"):
        run_json_part(python("import time; time.sleep(60)"), timeout_s=1.0)


def test_a_failed_part_is_reported_in_the_figures_and_the_bench_goes_on():
    results: dict = {"device": "cpu"}

    def failing() -> dict:
        return run_json_part(python("print('no figures')"))[0]

    assert not run_part(results, "server", failing)
    assert run_part(results, "other", lambda: {"x": 1.0})
    assert results["x"] == 1.0
    assert results["server_failed"].startswith("BenchPartFailed: ")

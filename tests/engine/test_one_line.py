"""engine.api.one_line: the one way an exception becomes a line of a log or a message."""

from __future__ import annotations

from engine.api import EngineError, one_line


def test_whitespace_runs_and_newlines_become_single_spaces():
    error = RuntimeError("CUDA error:\n  out of memory\t(tried 2 GiB)\n")
    assert one_line(error) == "CUDA error: out of memory (tried 2 GiB)"


def test_an_exception_without_text_is_named_by_its_type():
    assert one_line(KeyError()) == "KeyError"
    assert one_line(EngineError("   \n")) == "EngineError"


def test_limit_cuts_the_text_not_the_type_name():
    assert one_line(ValueError("x" * 50), limit=10) == "x" * 10
    assert one_line(ValueError(""), limit=3) == "ValueError"

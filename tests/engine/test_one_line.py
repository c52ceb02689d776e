"""engine.api.one_line: the one way an exception becomes a line of a log or a message."""

from __future__ import annotations

import re
from pathlib import Path

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


def test_with_type_names_the_type_first():
    assert one_line(ImportError("no\nmodule"), with_type=True) == "ImportError: no module"
    assert one_line(KeyError(), with_type=True) == "KeyError"


def test_engine_and_server_have_no_copy_of_it():
    """Issue 22: `_one_line` was written 10 times (first line only in some, the type's name
    first in others); every caller now imports this one."""
    root = Path(__file__).resolve().parents[2]
    copies = [
        str(path.relative_to(root))
        for package in ("engine", "lsp_server")
        for path in (root / package).rglob("*.py")
        if re.search(r"^\s*def _?one_line\(", path.read_text(encoding="utf-8"), re.M)
    ]
    assert copies == ["engine/api.py"]

"""`make run` (python -m lsp_server.demo) with the embedded model, through the real server: the
same output on every run, the suggestion an editor shows first apart from the manual-trigger
candidates, and timings that say what the engine ran."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.embedded_model import default_model_path

pytestmark = pytest.mark.skipif(
    default_model_path() is None, reason="this install carries no embedded model"
)


def run_demo() -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "lsp_server.demo"],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
        env={"HF_HUB_OFFLINE": "1", "PATH": "", "HOME": "/nonexistent"},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def timings_start(lines: list[str]) -> int:
    return lines.index(next(ln for ln in lines if ln.startswith("Timings: ")))


def test_the_demo_is_deterministic_and_says_what_it_ran():
    first, second = run_demo(), run_demo()
    timings = timings_start(first)
    # Everything but the measured times is the same on every run.
    assert first[:timings] == second[: timings_start(second)], (first, second)

    shown = first.index("Shown as you type (an automatic request: one suggestion, greedy):")
    manual = first.index(next(ln for ln in first if ln.startswith("On the manual trigger")))
    assert shown < manual < timings
    suggestion = [ln for ln in first[shown + 1 : manual] if ln.startswith("  | ")]
    assert suggestion, first  # the embedded model answers at this cursor
    candidates = [ln for ln in first[manual:timings] if ln[2:4].strip().isdigit()]
    assert [ln[2] for ln in candidates][0] == "1", first
    assert 2 <= len({ln[2] for ln in candidates}) <= 3, first  # several, numbered

    text = " ".join(" ".join(first[timings:]).split())
    assert "stop mode block" in text  # the sample's cursor is on an empty line in a body
    assert "candidates x span lengths (8/16/32 tokens" in text
    assert "automatic: 1 x 3 = 3 rows: engine " in text
    assert "manual: 3 x 3 = 9 rows: engine " in text
    assert "forward passes per token" in text

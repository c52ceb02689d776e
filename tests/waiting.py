"""Waiting in tests for a state another thread reaches: poll it with a generous deadline,
never sleep a fixed time (CI is a loaded 2-core machine)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Return once `predicate()` is true; fail the test if `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)

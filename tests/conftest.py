"""Shared pytest fixtures (helpers may add their own below; keep each one documented)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def memorized_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny Dream-layout checkpoint that memorized tests/fixtures/memorized.SNIPPETS.

    Trained once per session on CPU (deterministic: fixed seeds, one thread), saved in the
    published layout, so it loads through Engine.load / `--model <path>` like a real download.
    """
    from tests.fixtures.memorized import memorized_checkpoint

    return memorized_checkpoint(tmp_path_factory.mktemp("memorized"))

"""Shared pytest fixtures (helpers may add their own below; keep each one documented)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.setup.gpu_wheels import WHEELS

# The LSP server's and the HTTP API's packages (and the pytest plugins of their tests), which a
# lent GPU machine's stock image lacks (design/gpu-runbook.md). A test module or folder that
# cannot import one of them is skipped with that reason instead of failing collection, so
# `pytest -m gpu` there runs every GPU test that needs none of them. Any other import error
# still fails collection.
OPTIONAL_PACKAGES = frozenset({"msgspec", "pygls", "lsprotocol", "cattrs", "attrs", "aiohttp",
                               "prometheus_client", "pytest_asyncio", "pytest_lsp"})
_NO_MODULE = re.compile(r"No module named '([\w.]+)'")
# The ones `make gpu-wheels` carries to a GPU machine (engine/setup/gpu_wheels.py), by import name.
CARRIED = frozenset(name.replace("-", "_") for name, _, _ in WHEELS) | {"attr"}


def missing_optional_package(error_text: str) -> str | None:
    """The optional package a collection error is about, when it is only about those."""
    names = {name.split(".")[0] for name in _NO_MODULE.findall(error_text)}
    if names and names <= OPTIONAL_PACKAGES:
        return ", ".join(sorted(names))
    return None


class SkipWithoutOptionalPackages:
    """Turns such collection errors into skips. A plugin rather than a conftest hook: pytest
    leaves a folder's conftest hooks out while it collects a folder whose own conftest failed
    to import (tests/service), which is just the case to catch."""

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector):
        report = yield
        missing = missing_optional_package(str(report.longrepr)) if report.failed else None
        if missing is None:
            return report
        reason = f"Skipped: needs {missing}, which is not installed"
        if set(missing.split(", ")) <= CARRIED:
            reason += " (make gpu-wheels carries it)"
        return pytest.CollectReport(report.nodeid, "skipped", (str(collector.path), 0, reason),
                                    [])


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipWithoutOptionalPackages(), "maskfill-optional-packages")


@pytest.fixture(scope="session")
def memorized_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny Dream-layout checkpoint that memorized tests/fixtures/memorized.SNIPPETS.

    Trained once per session on CPU (deterministic: fixed seeds, one thread), saved in the
    published layout, so it loads through Engine.load / `--model <path>` like a real download.
    """
    from tests.fixtures.memorized import memorized_checkpoint

    return memorized_checkpoint(tmp_path_factory.mktemp("memorized"))

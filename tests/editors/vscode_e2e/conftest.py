"""Fixtures of the real-VS Code tests: the toolchain, the .vsix built from editors/vscode, one
headless Chromium per session, and code-servers for one test, ended by PID after it. A failed
test leaves a screenshot and the logs in a folder named after it (`failure_dir`).

These tests run under `make test-vscode` (which sets MASKFILL_VSCODE_E2E=1 after installing
code-server and node 24); under a plain `make test` they are skipped with that reason, so the
suite passes on a machine without Chromium. With MASKFILL_VSCODE_E2E=1 a missing part fails.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.editors.vscode_e2e import processes
from tests.editors.vscode_e2e.code_server import CodeServer
from tests.editors.vscode_e2e.harness import VSCode, launch_chromium, path_without_the_server
from tests.editors.vscode_e2e.toolchain import (
    Toolchain,
    ToolchainError,
    cache_dir,
    find,
    package_extension,
)

ENABLE_ENV = "MASKFILL_VSCODE_E2E"
ARTIFACTS_ENV = "MASKFILL_VSCODE_E2E_ARTIFACTS"  # where failures go; default .cache/vscode-e2e


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)  # read by the `vscode` fixture's teardown


@pytest.fixture(scope="session")
def toolchain() -> Toolchain:
    if os.environ.get(ENABLE_ENV) != "1":
        pytest.skip(
            "a real VS Code (code-server) in headless Chromium: run `make test-vscode`, which "
            f"installs node 24 and code-server into .cache/vscode-e2e and sets {ENABLE_ENV}=1"
        )
    try:
        return find()
    except ToolchainError as exc:
        pytest.fail(f"{exc}")


@pytest.fixture(scope="session")
def vsix(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The extension packaged from editors/vscode as `make vsix` does (vsce, the bundle only)."""
    return package_extension(tmp_path_factory.mktemp("vsix") / "maskfill.vsix")


@pytest.fixture(scope="session")
def browser(toolchain: Toolchain) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    before = {p.pid for p in processes.descendants(os.getpid())}
    try:
        with sync_playwright() as playwright:
            chromium = launch_chromium(playwright, toolchain)
            try:
                yield chromium
            finally:
                chromium.close()
    finally:
        # Playwright's driver and Chromium are ours to end: whatever of them is still alive.
        processes.end([p.pid for p in processes.descendants(os.getpid()) if p.pid not in before])


def failure_dir(item: pytest.Item) -> Path:
    """Where a failed test leaves its screenshot and logs: a folder named after the test."""
    configured = os.environ.get(ARTIFACTS_ENV)
    base = Path(configured) if configured else cache_dir() / "failures"
    return base / re.sub(r"[^\w.-]+", "_", item.name)


@pytest.fixture
def vscode(
    request: pytest.FixtureRequest, toolchain: Toolchain, vsix: Path, browser: Any, tmp_path: Path
) -> Iterator[Callable[..., VSCode]]:
    """Makes code-servers for this test; PATH holds no maskfill-lsp unless `path_env` says."""
    started: list[VSCode] = []

    def make(*, path_env: str | None = None, extra_env: dict[str, str] | None = None) -> VSCode:
        server = CodeServer(
            toolchain,
            tmp_path / f"code-server-{len(started)}",
            path_env=path_env if path_env is not None else path_without_the_server(),
            extra_env=extra_env,
        )
        started.append(VSCode(server, vsix, browser))
        return started[-1]

    yield make
    failed = any(
        getattr(getattr(request.node, f"report_{when}", None), "failed", False)
        for when in ("setup", "call")
    )
    for number, vs in enumerate(started):
        if failed:
            keep(vs, failure_dir(request.node) / f"code-server-{number}")
        vs.close()
        left = vs.server.processes()
        assert not left, f"processes left behind: {[p.command_line for p in left]}"


def keep(vs: VSCode, folder: Path) -> None:
    """The screenshot, the logs and the settings files of a failed test."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if vs.workbench is not None:
        try:
            vs.workbench.screenshot(folder / "screenshot.png")
            (folder / "page.html").write_text(vs.workbench.page.content())
            (folder / "workbench.txt").write_text(vs.workbench.details())
        except Exception as exc:  # a crashed page still leaves the logs
            (folder / "screenshot-failed.txt").write_text(str(exc))
    (folder / "diagnostics.txt").write_text(vs.server.diagnostics(tail=200_000))
    for name, path in (
        ("user-settings.json", vs.server.user_settings_file),
        ("remote-settings.json", vs.server.remote_settings_file),
        ("workspace-settings.json", vs.server.workspace_settings_file),
    ):
        if path.exists():
            shutil.copy(path, folder / name)
    print(f"\nvscode-e2e: screenshot and logs of the failure in {folder}")

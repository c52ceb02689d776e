"""What the real-VS Code tests and `make bench-vscode` share: Chromium's flags, where the
project's server is, and one code-server with its workbench open in a browser tab."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from tests.editors.vscode_e2e.code_server import CodeServer
from tests.editors.vscode_e2e.toolchain import Toolchain
from tests.editors.vscode_e2e.workbench import Workbench

VENV_SERVER = Path(sys.executable).parent / "maskfill-lsp"
# Chromium as it runs here: headless, no sandbox (CI is root), no GPU, and no background traffic
# to Google's hosts (refused on a closed network, many at a time).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def launch_chromium(playwright: Any, toolchain: Toolchain) -> Any:
    return playwright.chromium.launch(
        executable_path=str(toolchain.chromium), headless=True, args=CHROMIUM_ARGS
    )


def path_without_the_server() -> str:
    """This PATH less every folder that holds a `maskfill-lsp` (the venv's bin among them)."""
    folders = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(d for d in folders if d and not (Path(d) / "maskfill-lsp").exists())


class VSCode:
    """A code-server with the extension; `launch()` starts it and opens the workbench."""

    def __init__(self, server: CodeServer, vsix: Path, browser: Any):
        self.server = server
        self._vsix = vsix
        self._browser = browser
        self.workbench: Workbench | None = None

    def launch(self) -> Workbench:
        self.server.install_extension(self._vsix)
        url = self.server.start()
        self.workbench = Workbench.open(self._browser, url, self.server.diagnostics)
        return self.workbench

    def close(self) -> None:
        """Close the tab, then end code-server and everything it started, by PID."""
        try:
            if self.workbench is not None:
                self.workbench.close()
        finally:
            self.server.stop()

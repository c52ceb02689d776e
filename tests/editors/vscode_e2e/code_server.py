"""One code-server (VS Code 1.139 serving its workbench to a browser) for one test: on loopback,
with throwaway user-data, extensions and home folders, the extension gallery pointed at a closed
port, and every process it started ended by PID when the test ends.

Settings go where a user would put them: User (`User/settings.json`), Remote, which code-server
calls Machine (`Machine/settings.json`), and the workspace's `.vscode/settings.json`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.editors.vscode_e2e import processes
from tests.editors.vscode_e2e.toolchain import Toolchain

START_TIMEOUT_S = 60.0
INSTALL_TIMEOUT_S = 120.0
CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused
LISTENING = re.compile(r"HTTP server listening on (http://127\.0\.0\.1:\d+)/")
# Quiet, offline and deterministic: no telemetry, no update or gallery checks, no walkthroughs,
# no built-in AI features asking to sign in.
BASE_USER_SETTINGS: dict[str, Any] = {
    "telemetry.telemetryLevel": "off",
    "update.mode": "none",
    "extensions.autoCheckUpdates": False,
    "extensions.autoUpdate": False,
    "extensions.ignoreRecommendations": True,
    "workbench.startupEditor": "none",
    "workbench.enableExperiments": False,
    "workbench.tips.enabled": False,
    "workbench.welcomePage.walkthroughs.openOnInstall": False,
    "chat.disableAIFeatures": True,
    "git.enabled": False,
    "security.workspace.trust.enabled": False,
    "remote.autoForwardPorts": False,  # no "your application on port N" for other processes
}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


class CodeServer:
    """code-server's folders under `root`, the process once started, and what it logged."""

    def __init__(
        self,
        toolchain: Toolchain,
        root: Path,
        *,
        path_env: str | None = None,
        extra_env: dict[str, str] | None = None,
    ):
        self.toolchain = toolchain
        self.root = root
        self.user_data = root / "user-data"
        self.extensions = root / "extensions"
        self.workspace = root / "workspace"
        self.home = root / "home"
        self.log_file = root / "code-server.log"
        for folder in (self.user_data, self.extensions, self.workspace, self.home):
            folder.mkdir(parents=True, exist_ok=True)
        self.config = root / "config.yaml"
        self.config.write_text("auth: none\ncert: false\n", encoding="utf-8")
        self.env = self._environment(path_env, extra_env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.url: str | None = None
        self.set_user_settings({})

    def _environment(self, path_env: str | None, extra: dict[str, str]) -> dict[str, str]:
        # Nothing of an enclosing VS Code session (VSCODE_IPC_HOOK_CLI, ...) may leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("VSCODE_")}
        node_bin = str(self.toolchain.node.parent)
        env.update(
            {
                "PATH": os.pathsep.join([node_bin, path_env or os.environ.get("PATH", "")]),
                # code-server writes its config and state under HOME / XDG folders: keep them here.
                "HOME": str(self.home),
                "XDG_CONFIG_HOME": str(self.home / ".config"),
                "XDG_DATA_HOME": str(self.home / ".local" / "share"),
                "XDG_CACHE_HOME": str(self.home / ".cache"),
                "EXTENSIONS_GALLERY": json.dumps(
                    {
                        "serviceUrl": CLOSED_PORT,
                        "itemUrl": CLOSED_PORT,
                        "resourceUrlTemplate": CLOSED_PORT,
                    }
                ),
                "HF_HUB_OFFLINE": "1",
                **extra,
            }
        )
        return env

    # -- settings, as a user would write them ------------------------------------------------

    @property
    def user_settings_file(self) -> Path:
        return self.user_data / "User" / "settings.json"

    @property
    def remote_settings_file(self) -> Path:
        return self.user_data / "Machine" / "settings.json"

    @property
    def workspace_settings_file(self) -> Path:
        return self.workspace / ".vscode" / "settings.json"

    def set_user_settings(self, settings: dict[str, Any]) -> None:
        write_json(self.user_settings_file, {**BASE_USER_SETTINGS, **settings})

    def set_remote_settings(self, settings: dict[str, Any]) -> None:
        write_json(self.remote_settings_file, settings)

    def set_workspace_settings(self, settings: dict[str, Any]) -> None:
        write_json(self.workspace_settings_file, settings)

    def read_settings(self, path: Path) -> dict[str, Any]:
        """A settings file as VS Code left it (JSON with comments allowed: none are written)."""
        text = path.read_text(encoding="utf-8") if path.exists() else "{}"
        return json.loads(text or "{}")

    # -- the process ---------------------------------------------------------------------------

    def _command(self, *args: str) -> list[str]:
        return [
            *self.toolchain.code_server_command(),
            "--config",
            str(self.config),
            "--user-data-dir",
            str(self.user_data),
            "--extensions-dir",
            str(self.extensions),
            *args,
        ]

    def install_extension(self, vsix: Path) -> None:
        proc = subprocess.run(
            self._command("--install-extension", str(vsix), "--force"),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, f"--install-extension failed:\n{proc.stdout}\n{proc.stderr}"
        assert "successfully installed" in proc.stdout, proc.stdout
        installed = [p.name for p in self.extensions.iterdir() if p.name.startswith("maskfill.")]
        assert installed, f"no maskfill extension in {self.extensions}: {proc.stdout}"

    def start(self) -> str:
        """Start serving on a free loopback port; the workbench URL opening the workspace."""
        assert self.process is None, "already started"
        self.process = subprocess.Popen(
            self._command(
                "--bind-addr",
                "127.0.0.1:0",
                "--auth",
                "none",
                "--disable-telemetry",
                "--disable-update-check",
                "--disable-workspace-trust",
                "--disable-getting-started-override",
                "--disable-proxy",
                "--ignore-last-opened",
            ),
            env=self.env,
            cwd=self.workspace,
            stdin=subprocess.DEVNULL,
            stdout=self.log_file.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log_file.read_text(errors="replace"))
            if match:
                self.url = f"{match.group(1)}/?folder={self.workspace}"
                return self.url
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"code-server did not start:\n{self.diagnostics()}")

    def processes(self) -> list[processes.Process]:
        return processes.descendants(self.process.pid) if self.process else []

    def server_processes(self) -> list[processes.Process]:
        """The maskfill language servers the extension started (python ... maskfill-lsp)."""
        return [p for p in self.processes() if is_maskfill_server(p)]

    def stop(self) -> None:
        """End code-server and everything below it, by PID, whatever state they are in."""
        if self.process is None:
            return
        below = [p.pid for p in self.processes()]
        processes.end([self.process.pid], grace=5.0)
        processes.end(below, grace=3.0)  # the ones code-server did not take down with it
        self.process.wait(timeout=10)

    # -- what it logged --------------------------------------------------------------------------

    def log_files(self, pattern: str) -> list[Path]:
        return sorted((self.user_data / "logs").glob(pattern), key=lambda p: p.stat().st_mtime)

    def output_channel(self) -> str:
        """The extension's "maskfill" output channel, as VS Code writes it to disk."""
        files = self.log_files("*/exthost*/maskfill.maskfill/*.log")
        return "\n".join(p.read_text(errors="replace") for p in files)

    def diagnostics(self, tail: int = 4000) -> str:
        parts = [("code-server", self.log_file)]
        parts += [("output: maskfill", p) for p in self.log_files("*/exthost*/maskfill.maskfill/*")]
        parts += [("extension host", p) for p in self.log_files("*/exthost*/remoteexthost.log")]
        text = []
        for title, path in parts:
            body = path.read_text(errors="replace")[-tail:] if path.exists() else "(none)"
            text.append(f"--- {title} ({path})\n{body}")
        return "\n".join(text)


def is_maskfill_server(proc: processes.Process) -> bool:
    return any(part.endswith(("maskfill-lsp", "lsp_server")) for part in proc.argv)

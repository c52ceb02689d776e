"""Find the user's engine for a model+device+quant, or start one, detached.

The engine outlives the language server that started it (its own session, stdio closed,
logs to a file in the runtime folder) and exits by itself after an idle timeout. Two servers
starting at once may both spawn: the engine lock lets one win, the other exits with
EXIT_ALREADY_RUNNING and both servers connect to the winner.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from engine.api import EngineError
from engine.serve import paths
from engine.serve.client import EngineConnection, EngineGone
from engine.serve.server import EXIT_ALREADY_RUNNING
from engine.serve.setup_deadline import EngineSetupTimeout

START_TIMEOUT_S = 120.0  # Python + torch import on a busy machine; the model loads after
POLL_S = 0.05
HAS_UNIX_SOCKETS = hasattr(socket, "AF_UNIX")


class EngineExited(EngineError):
    """The engine process started here exited before it answered (crashed, killed)."""


class EngineLocation:
    """Where one model+device+quant's engine lives in a runtime folder."""

    def __init__(self, model: str, device: str, quant: str, folder: Path | None = None):
        if Path(model).exists():  # the engine runs in another folder: no relative paths
            model = str(Path(model).resolve())
        self.model, self.device, self.quant = model, device, quant
        self.folder = paths.private_dir(folder or paths.runtime_dir())
        key = paths.engine_key(model, device, quant)
        self.socket = paths.socket_path(self.folder, key)
        self.lock = paths.lock_path(self.folder, key)
        self.log = paths.log_path(self.folder, key)
        self.endpoint_file = self.folder / f"engine-{key}.json"  # TCP transport (Windows)
        self.token_file = self.folder / paths.TOKEN_FILE_NAME


def connect(location: EngineLocation, name: str, *, use_unix: bool = HAS_UNIX_SOCKETS
            ) -> EngineConnection:
    """Connect to a running engine; OSError/EngineGone when there is none, EngineSetupTimeout
    when one is there but silent (connect_or_start treats the three alike)."""
    if use_unix:
        return EngineConnection.unix(location.socket, name=name)
    try:
        endpoints = json.loads(location.endpoint_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConnectionRefusedError(f"no engine endpoint file: {exc}") from None
    host, _, port = endpoints["tcp"].rpartition(":")
    token = paths.read_token(location.token_file)
    return EngineConnection.tcp(host, int(port), token=token, name=name)


def connect_or_start(location: EngineLocation, name: str, *, idle_exit_s: float = 300.0,
                     start_timeout_s: float = START_TIMEOUT_S,
                     use_unix: bool = HAS_UNIX_SOCKETS) -> EngineConnection:
    try:
        return connect(location, name, use_unix=use_unix)
    except (OSError, EngineGone, EngineSetupTimeout):
        pass  # none running, or a crashed engine's socket file: start one
    process = spawn(location, idle_exit_s=idle_exit_s, use_unix=use_unix)
    deadline = time.monotonic() + start_timeout_s
    while True:
        try:
            return connect(location, name, use_unix=use_unix)
        except (OSError, EngineGone, EngineSetupTimeout):
            pass
        code = process.returncode  # set by the reaper thread (poll() would race with it)
        if code is not None and code != EXIT_ALREADY_RUNNING:
            raise EngineExited(f"the engine exited with code {code}: {log_tail(location.log)}")
        if time.monotonic() > deadline:
            raise EngineError(f"the engine did not start within {start_timeout_s:.0f} s "
                              f"(log: {location.log})")
        time.sleep(POLL_S)


def wait_ready(connection: EngineConnection, timeout_s: float) -> None:
    """Block until the engine's model is loaded; EngineError with its reason if it failed."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = connection.status()
        if status.state == "ready":
            return
        if status.state in ("failed", "closed"):
            raise EngineError(status.error or f"the engine is {status.state}")
        if time.monotonic() > deadline:
            raise EngineError(f"the engine's model did not load within {timeout_s:.0f} s")
        time.sleep(0.1)


def spawn(location: EngineLocation, *, idle_exit_s: float, use_unix: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "engine", "serve", "--model", location.model,
               "--device", location.device, "--quant", location.quant,
               "--lock", str(location.lock), "--idle-exit-s", str(idle_exit_s)]
    if use_unix:
        command += ["--socket", str(location.socket)]
    else:
        command += ["--no-socket", "--tcp", "127.0.0.1:0", "--token-file",
                    str(location.token_file), "--endpoint-file", str(location.endpoint_file)]
    # Whatever way this interpreter found the package, the engine finds it the same way.
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Appended, not truncated: a racing second spawn must not wipe the winner's log.
    log_fd = os.open(location.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        detach = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP
                   | subprocess.DETACHED_PROCESS} if sys.platform == "win32"
                  else {"start_new_session": True})
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_fd,
            cwd=str(location.folder), env=env, close_fds=True, **detach)
    finally:
        os.close(log_fd)
    # Reap it if it exits while we live (no zombie); once we exit, init adopts it.
    threading.Thread(target=process.wait, name="maskfill-engine-reaper", daemon=True).start()
    return process


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"

"""Run an untrusted Python program (benchmark solution + its tests) in a throwaway sandbox.

Each program runs in a fresh interpreter (`-I`: no user site, no environment-driven imports) in
its own temporary directory, with a wall-clock timeout that kills its whole process group, an
address-space limit, and no network: inside an empty network namespace (`unshare --net`) when the
kernel allows it, and with socket connect/bind disabled in any case.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache

MEMORY_LIMIT_BYTES = 4 * 2**30
OUTPUT_LIMIT_CHARS = 2000

# Runs before the program, in the child. Kept small: it only removes capabilities.
_GUARD = r"""
import resource, socket, sys
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))
def _denied(*args, **kwargs):
    raise OSError("network access is disabled in the eval sandbox")
for _name in ("connect", "connect_ex", "bind", "sendto", "sendmsg"):
    setattr(socket.socket, _name, _denied)
socket.create_connection = _denied
socket.getaddrinfo = _denied
sys.argv = ["program.py"]
_source = open("program.py", encoding="utf-8").read()
exec(compile(_source, "program.py", "exec"), {{"__name__": "__main__"}})
"""


@dataclass(frozen=True)
class Outcome:
    status: str  # "passed" | "failed" | "timeout"
    detail: str = ""  # tail of stderr for failures

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@cache
def _netns_prefix() -> tuple[str, ...]:
    """`unshare --net` (as a mapped root in a user namespace) if this kernel permits it."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    for prefix in ((exe, "--net"), (exe, "--net", "--map-root-user")):
        try:
            done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return prefix
    return ()


def network_isolation() -> str:
    return "network namespace + socket guard" if _netns_prefix() else "socket guard only"


def run_program(program: str, timeout_s: float = 10.0) -> Outcome:
    """Execute `program`; passed means exit status 0 within the timeout."""
    with tempfile.TemporaryDirectory(prefix="maskfill-eval-") as tmp:
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as fh:
            fh.write(program)
        guard = _GUARD.format(mem=MEMORY_LIMIT_BYTES)
        cmd = [*_netns_prefix(), sys.executable, "-I", "-c", guard]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return Outcome("timeout", f"no exit within {timeout_s:g} s")
        finally:
            _kill_group(proc)  # stray children of a finished program
        if proc.returncode == 0:
            return Outcome("passed")
        text = err.decode("utf-8", "replace").strip()
        return Outcome("failed", text[-OUTPUT_LIMIT_CHARS:])


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass

"""Where a user's engine lives: a private runtime folder, one socket per model+device+quant,
and the token file that TCP clients must present.

Private means: the folder is 0700 and owned by this user, sockets and tokens are 0600. A folder
or token file that others could read is refused (like ssh refuses a readable key), because
anyone who can open the socket can run the model and read completions.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
import sys
import tempfile
from pathlib import Path

from engine.api import EngineError

RUNTIME_DIR_ENV = "MASKFILL_RUNTIME_DIR"  # tests and unusual setups point it elsewhere
TOKEN_FILE_NAME = "token"


def runtime_dir() -> Path:
    """$MASKFILL_RUNTIME_DIR, else $XDG_RUNTIME_DIR/maskfill, else <tmp>/maskfill-<uid>."""
    if explicit := os.environ.get(RUNTIME_DIR_ENV):
        return Path(explicit)
    if sys.platform != "win32" and (xdg := os.environ.get("XDG_RUNTIME_DIR")):
        return Path(xdg) / "maskfill"
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or tempfile.gettempdir()
        return Path(base) / "maskfill"
    return Path(tempfile.gettempdir()) / f"maskfill-{os.getuid()}"


def private_dir(path: Path) -> Path:
    """Create `path` 0700, or check that an existing one is ours and closed to others."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineError(f"cannot create the engine folder {path}: {exc.strerror}") from None
    if sys.platform == "win32":  # NTFS ACLs of LOCALAPPDATA are per-user already
        return path
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise EngineError(f"{path} is not a folder (a link?); refusing to put the engine there")
    if info.st_uid != os.getuid():
        raise EngineError(f"{path} belongs to another user; refusing to use it")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours but too open (made by hand?): close it
    return path


def engine_key(model: str, device: str, quant: str) -> str:
    """One engine per model+device+quant: a short stable name for its socket and lock."""
    if Path(model).exists():
        model = str(Path(model).resolve())
    digest = hashlib.sha256("\0".join((model, device, quant)).encode()).hexdigest()
    return digest[:16]


def socket_path(folder: Path, key: str) -> Path:
    return folder / f"engine-{key}.sock"


def lock_path(folder: Path, key: str) -> Path:
    return folder / f"engine-{key}.lock"


def log_path(folder: Path, key: str) -> Path:
    return folder / f"engine-{key}.log"


def ensure_token(path: Path) -> str:
    """The token stored at `path`, created (0600, random) when missing."""
    if not path.exists():
        private_dir(path.parent)
        token = secrets.token_urlsafe(32)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with contextlib.suppress(FileExistsError):  # another process made it first: read theirs
            fd = os.open(path, flags, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(token + "\n")
    return read_token(path)


def read_token(path: Path) -> str:
    """Read a token file that only this user can read; anything else is refused."""
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise EngineError(f"cannot read the token file {path}: {exc.strerror}") from None
    if sys.platform != "win32":
        if info.st_uid != os.getuid():
            raise EngineError(f"token file {path} belongs to another user; refusing it")
        if info.st_mode & 0o077:
            raise EngineError(
                f"token file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):o}); "
                f"run `chmod 600 {path}`"
            )
    if not text:
        raise EngineError(f"token file {path} is empty")
    return text


class EngineLock:
    """An exclusive lock held for the engine's lifetime: a second engine for the same key
    fails to take it and steps aside, and a crashed engine's lock dies with its process, which
    is how a stale socket file is known to be stale."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def acquire(self) -> bool:
        handle = open(self.path, "a+b")  # noqa: SIM115 - held open for the process lifetime
        try:
            if sys.platform == "win32":
                import msvcrt

                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._file = handle
        return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None

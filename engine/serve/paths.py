"""Where a user's engine lives: a private runtime folder, one socket per model+device+quant,
and the token file that TCP clients must present.

Private means: the runtime folder is created 0700, sockets and tokens are 0600. A token file that
others could read is refused (like ssh refuses a readable key), because anyone who can open the
socket can run the model and read completions. A folder maskfill did not just create is never
chmodded: one where someone else could replace our files is refused instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
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
    """maskfill's own runtime folder: created 0700 when missing; an existing one must be a real
    folder (not a link), ours, and writable by nobody else. It is never chmodded: a folder we did
    not just create is the user's to change (issue 20.7)."""
    _make_missing(path)
    if sys.platform == "win32":  # NTFS ACLs of LOCALAPPDATA are per-user already
        return path
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise EngineError(f"{path} is not a folder (a link?); refusing to put the engine there")
    if info.st_uid != os.getuid():
        raise EngineError(f"{path} belongs to another user; refusing to use it")
    if info.st_mode & 0o022:
        raise EngineError(f"{path} is writable by others (mode {stat.S_IMODE(info.st_mode):o}): "
                          f"they could replace the engine's socket or token; run "
                          f"`chmod go-w {path}` or remove it (maskfill creates it 0700)")
    return path


def safe_dir(path: Path) -> Path:
    """A folder the user named for a socket or token file (--socket, --token-file): created 0700
    when missing, else used as it is, never chmodded (it may be the home folder, or /tmp). Refused
    when someone else could swap our file in it: a folder owned by another user (root aside), or
    one that others may write without the sticky bit (/tmp's 1777 is fine)."""
    _make_missing(path)
    if sys.platform == "win32":
        return path
    try:
        info = path.stat()  # a link the user made is theirs to follow (macOS's /tmp is one)
    except OSError as exc:
        raise EngineError(f"cannot use the folder {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise EngineError(f"{path} is not a folder")
    if info.st_uid not in (os.getuid(), 0):
        raise EngineError(f"{path} belongs to another user (uid {info.st_uid}), who could "
                          "replace files in it; choose a folder of your own")
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        raise EngineError(f"{path} is writable by others without the sticky bit (mode "
                          f"{stat.S_IMODE(info.st_mode):o}): anyone could replace a file in it; "
                          "choose a folder of your own (maskfill never changes a folder's mode)")
    return path


def usable_dir(path: Path) -> Path:
    """private_dir for the runtime folder, safe_dir for a folder the user chose."""
    return private_dir(path) if path == runtime_dir() else safe_dir(path)


def _make_missing(path: Path) -> None:
    """Create `path` and any missing parent, each 0700 (mkdir's `parents` would use the umask);
    existing folders are left exactly as they are."""
    missing = []
    folder = path
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:  # another process made it first: checked like any other
            pass
        except OSError as exc:
            raise EngineError(f"cannot create the folder {folder}: {exc.strerror}") from None


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
        usable_dir(path.parent)
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


def token_matches(offered: str | None, token: str) -> bool:
    """Constant-time comparison that survives any text a client sends: HTTP headers decode
    undecodable bytes to lone surrogates (`Bearer \\xff\\xfe`), JSON can carry "\\ud800";
    neither encodes as UTF-8, and neither is the token (issue 20.8)."""
    try:
        sent = (offered or "").encode("utf-8")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(sent, token.encode("utf-8"))


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

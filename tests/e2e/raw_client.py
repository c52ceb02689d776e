"""A deliberately plain JSON-RPC client for hostile-input tests: it sends any bytes (broken
frames, invalid params, odd ids) to the real `python -m lsp_server` over stdio or TCP and
records every frame that comes back, plus any byte on stdout that is not part of a frame.

pytest-lsp cannot be used for these: it refuses to send what the protocol does not allow.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from tests.e2e.server_session import GATED_SERVER, TEST_SETTINGS  # shared with pytest-lsp tests

LIVENESS_S = 60.0  # generous: the shared CI CPU may be busy; this is a liveness bound only
INLINE_CAPABILITIES = {
    "general": {"positionEncodings": ["utf-16"]},
    "textDocument": {"inlineCompletion": {}},
}


def frame(message: Any) -> bytes:
    body = json.dumps(message).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


class Connection:
    """One byte stream to the server: frames out, frames in (parsed by a reader thread)."""

    def __init__(self, reader: BinaryIO, write: Callable[[bytes], None]):
        self._reader = reader
        self._write = write
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self.messages: list[dict] = []  # every frame received, in order
        self.stray = b""  # bytes that were not part of a well-formed frame
        self.closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    # -- reading ----------------------------------------------------------------------------

    def _read(self) -> None:
        try:
            while True:
                length = self._read_headers()
                if length is None:
                    break
                body = self._read_exactly(length)
                if body is None:
                    break
                try:
                    message = json.loads(body)
                except ValueError:
                    message = {"unparsable": body.decode(errors="replace")}
                with self._lock:
                    self.messages.append(message)
                    self._lock.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._lock:
                self.closed = True
                self._lock.notify_all()

    def _read_headers(self) -> int | None:
        length = None
        while True:
            line = self._reader.readline()
            if not line:
                return None
            if line == b"\r\n":
                if length is None:
                    self.stray += line
                    continue
                return length
            name, sep, value = line.partition(b":")
            if not sep or not line.endswith(b"\r\n"):
                self.stray += line
                continue
            if name.strip().lower() == b"content-length":
                length = int(value.strip())

    def _read_exactly(self, length: int) -> bytes | None:
        data = b""
        while len(data) < length:
            chunk = self._reader.read(length - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = LIVENESS_S) -> dict:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                if self.closed or remaining <= 0:
                    raise AssertionError(
                        f"no matching message (closed={self.closed}); got {self.messages[-5:]}"
                    )
                self._lock.wait(remaining)

    def wait_closed(self, timeout: float = LIVENESS_S) -> None:
        """Until the peer has closed the stream."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self.closed:
                remaining = deadline - time.monotonic()
                assert remaining > 0, "the stream is still open"
                self._lock.wait(remaining)

    def response(self, msg_id: Any, timeout: float = LIVENESS_S) -> dict:
        return self.wait_for(
            lambda m: m.get("id") == msg_id and ("result" in m or "error" in m), timeout
        )

    def responses_to(self, msg_id: Any) -> list[dict]:
        with self._lock:
            return [m for m in self.messages if m.get("id") == msg_id and "method" not in m]

    def notifications(self, method: str) -> list[dict]:
        with self._lock:
            return [m for m in self.messages if m.get("method") == method and "id" not in m]

    # -- writing ----------------------------------------------------------------------------

    def send_bytes(self, data: bytes) -> None:
        self._write(data)

    def send(self, message: Any) -> None:
        self._write(frame(message))

    def request(self, method: str, params: Any = None, msg_id: Any = None) -> Any:
        msg_id = next(self._ids) if msg_id is None else msg_id
        message = {"jsonrpc": "2.0", "id": msg_id, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)
        return msg_id

    def call(self, method: str, params: Any = None, timeout: float = LIVENESS_S) -> dict:
        return self.response(self.request(method, params), timeout)

    def notify(self, method: str, params: Any = None) -> None:
        message = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)

    # -- LSP conveniences -------------------------------------------------------------------

    def initialize(
        self,
        *,
        settings: dict | None = None,
        process_id: int | None = None,
        capabilities: dict | None = None,
        initialized: bool = True,
    ) -> dict:
        reply = self.call(
            "initialize",
            {
                "processId": process_id,
                "rootUri": None,
                "capabilities": INLINE_CAPABILITIES if capabilities is None else capabilities,
                "initializationOptions": {**TEST_SETTINGS, **(settings or {})},
            },
        )
        assert "result" in reply, reply
        if initialized:
            self.notify("initialized", {})
        return reply

    def open(self, uri: str, text: str, version: int = 1) -> None:
        self.notify(
            "textDocument/didOpen",
            {"textDocument": {"uri": uri, "languageId": "python", "version": version,
                              "text": text}},
        )

    def change(self, uri: str, version: int, start: tuple[int, int], end: tuple[int, int],
               text: str) -> None:
        self.notify(
            "textDocument/didChange",
            {
                "textDocument": {"uri": uri, "version": version},
                "contentChanges": [{"range": {"start": position(*start), "end": position(*end)},
                                    "text": text}],
            },
        )

    def status(self, timeout: float = LIVENESS_S) -> dict:
        reply = self.call("workspace/executeCommand", {"command": "maskfill.status"}, timeout)
        assert "result" in reply, reply
        return reply["result"]

    def wait_loaded(self, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            current = self.status()
            if current["loadState"] in ("ready", "failed"):
                return current
            assert time.monotonic() < deadline, current
            time.sleep(0.05)


def position(line: int, character: int) -> dict:
    return {"line": line, "character": character}


def inline_params(uri: str, line: int, character: int, trigger: int = 1) -> dict:
    return {
        "textDocument": {"uri": uri},
        "position": position(line, character),
        "context": {"triggerKind": trigger},
    }


class Server:
    """`python -m lsp_server ARGS` with its stdin/stdout as a Connection; stderr to a file."""

    def __init__(self, args: list[str], stderr_file: Path, *, load_gate: Path | None = None,
                 env: dict | None = None):
        launcher = ["-m", "lsp_server"] if load_gate is None else [
            "-c", GATED_SERVER, str(load_gate)]
        self.stderr_file = stderr_file
        self._stderr = open(stderr_file, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, *launcher, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        stdin = self.process.stdin

        def write(data: bytes) -> None:
            stdin.write(data)
            stdin.flush()

        self.connection = Connection(self.process.stdout, write)

    def __getattr__(self, name: str) -> Any:  # the connection's methods, on the server
        return getattr(self.connection, name)

    def wait_exit(self, timeout: float = LIVENESS_S) -> int:
        return self.process.wait(timeout)

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_file.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        """End the process whatever state it is in (tests call this in `finally`)."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.connection.request("shutdown")
                self.connection.notify("exit")
                self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._stderr.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def connect(port: int, timeout: float = LIVENESS_S) -> tuple[socket.socket, Connection]:
    """Connect to a `--tcp` server, retrying while it starts."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            break
        except OSError:
            assert time.monotonic() < deadline, "the TCP server never listened"
            time.sleep(0.05)
    sock.settimeout(None)
    return sock, Connection(sock.makefile("rb"), sock.sendall)

"""A stdio relay between the editor and `maskfill-lsp` that notes when each inline completion
request reached the server and when its answer left it: the server's own latency for the very
requests the editor made, while the bytes pass unchanged.

    python -m tests.editors.vscode_e2e.lsp_tap LOG -- maskfill-lsp --stdio

LOG gets one JSON line per request of the editor ({"dir": "in", "id", "method", "t"}; inline
completions also say whether VS Code's suggest widget had an item "selection"), per cancellation
("method": "cancel") and per answer ({"dir": "out", "id", "method", "t"}, with "items" for inline
completions and "error" when it failed); `t` in epoch milliseconds (the clock the browser's
performance.timeOrigin uses).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Any

INLINE = "textDocument/inlineCompletion"


def read_message(stream: IO[bytes]) -> tuple[bytes, bytes] | None:
    """One LSP frame: (raw bytes, body), or None at the end of the stream."""
    header = b""
    while not header.endswith(b"\r\n\r\n"):
        byte = stream.read(1)
        if not byte:
            return None
        header += byte
    length = next(
        int(line.split(b":", 1)[1])
        for line in header.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    body = stream.read(length)
    return header + body, body


class Recorder:
    def __init__(self, log: IO[str]):
        self.log = log
        self.lock = threading.Lock()
        self.asked: dict[Any, str] = {}  # the editor's request ids -> methods

    def note(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()

    def from_editor(self, body: bytes, at: float) -> None:
        message = json.loads(body)
        method = message.get("method")
        if method == "$/cancelRequest":
            self.note({"dir": "in", "id": message["params"]["id"], "method": "cancel", "t": at})
        elif method is not None and "id" in message:  # a request (not a notification)
            with self.lock:
                self.asked[message["id"]] = method
            record = {"dir": "in", "id": message["id"], "method": method, "t": at}
            if method == INLINE:  # whether VS Code's suggest widget had an item selected
                context = message.get("params", {}).get("context", {})
                record["selection"] = context.get("selectedCompletionInfo") is not None
            self.note(record)

    def from_server(self, body: bytes, at: float) -> None:
        message = json.loads(body)
        if "method" in message:  # the server's own notification or request
            return
        with self.lock:
            method = self.asked.pop(message.get("id"), None)
        if method is None:
            return
        record = {"dir": "out", "id": message["id"], "method": method, "t": at}
        if message.get("error"):
            record["error"] = message["error"]
        if method == INLINE:
            result = message.get("result") or {}
            items = result.get("items", []) if isinstance(result, dict) else result
            record["items"] = len(items)
        self.note(record)


def relay(source: IO[bytes], sink: IO[bytes], seen) -> None:
    while (frame := read_message(source)) is not None:
        raw, body = frame
        seen(body, time.time() * 1000)  # before forwarding: the moment it reached the server
        sink.write(raw)
        sink.flush()
    sink.close()


def main(argv: list[str]) -> int:
    split = argv.index("--")
    log_path, command = argv[0], argv[split + 1 :]
    with open(log_path, "a", encoding="utf-8") as log:
        recorder = Recorder(log)
        server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        signal.signal(signal.SIGTERM, lambda *_: server.terminate())
        editor_in, editor_out = sys.stdin.buffer, sys.stdout.buffer
        inbound = threading.Thread(
            target=relay, args=(editor_in, server.stdin, recorder.from_editor), daemon=True
        )
        inbound.start()
        relay(server.stdout, editor_out, recorder.from_server)
        return server.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

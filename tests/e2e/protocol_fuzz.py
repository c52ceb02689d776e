"""Random hostile traffic for the protocol fuzz test (tests/e2e/test_hostile_protocol.py).

Each case is one message: a malformed frame, a random JSON value, a request whose params are
a valid template with one field mutated, or a notification (documents opened and edited at
random positions with non-ASCII text, settings, cancellations). Requests with a usable id are
recorded: each must get exactly one answer. Seeded: a failure repeats.
"""

from __future__ import annotations

import random
from typing import Any

from tests.e2e.raw_client import Server

MALFORMED = [
    b"Content-Length: 4611686018427387904\r\n\r\n",
    b"Content-Length: 99999999999999999999999999999\r\n\r\n",
    b"Content-Length: 70000000\r\n\r\n",
    b"Content-Length: -1\r\n\r\n",
    b"Content-Length: 0\r\n\r\n",
    b"Content-Length: 1e3\r\n\r\n",
    b"Content-Type: x\r\n\r\n",
    b"garbage\r\n\r\n",
    b"x" * 10000 + b"\r\n\r\n",
    b"\xff\xfe\x00\r\n\r\n",
]
ODD_VALUES: list[Any] = [None, -1, 2**31, 2**63, -(2**63), 1.5, True, "", "x" * 300, [], {},
                         {"line": 0}, [0, 0], "\ud800", "é中😀"]
TEXT_PIECES = ["a", " ", "é", "中", "😀", "\n", "\r\n", "\r", "\t", "\ud800", "\u2028", "(",
               ")", "def f(x):", "return", "\x00"]
URIS = [f"file:///fuzz/{name}" for name in ("a.py", "b.py", "c%20d.py", "é.py")]
METHODS = ["textDocument/inlineCompletion", "textDocument/completion",
           "workspace/executeCommand", "textDocument/hover", "initialize", "$/unknown",
           "maskfill/none"]
SETTING_KEYS = ["maxTokens", "timeoutMs", "debounceMinMs", "debounceMaxMs", "stopMode",
                "numCandidates", "contextTokens", "contextLinesBefore", "languages", "cacheSize",
                "maxDocumentBytes", "enabled", "unknownKey"]


class Fuzzer:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.request_ids: list[Any] = []
        self._next_id = 10**6  # apart from the ids the test's own requests use
        self._versions: dict[str, int] = {}

    # -- values -----------------------------------------------------------------------------

    def text(self, most: int = 60) -> str:
        return "".join(self.rng.choice(TEXT_PIECES) for _ in range(self.rng.randint(0, most)))

    def number(self) -> int:
        return self.rng.choice([0, 1, 2, 3, 7, 40, self.rng.randint(0, 200)])

    def position(self) -> dict:
        return {"line": self.number(), "character": self.number()}

    def odd(self) -> Any:
        return self.rng.choice(ODD_VALUES)

    def mutate(self, value: Any, depth: int = 0) -> Any:
        """`value` with one field removed or replaced by an odd value (or left alone)."""
        if isinstance(value, dict) and value and depth < 4:
            key = self.rng.choice(sorted(value))
            roll = self.rng.random()
            if roll < 0.2:
                return {k: v for k, v in value.items() if k != key}
            if roll < 0.5:
                return {**value, key: self.odd()}
            return {**value, key: self.mutate(value[key], depth + 1)}
        return self.odd() if self.rng.random() < 0.5 else value

    # -- messages ---------------------------------------------------------------------------

    def request_params(self, method: str) -> Any:
        uri = self.rng.choice(URIS)
        trigger = self.rng.choice([1, 2])
        templates = {
            "textDocument/inlineCompletion": {
                "textDocument": {"uri": uri}, "position": self.position(),
                "context": {"triggerKind": trigger, "selectedCompletionInfo": {
                    "range": {"start": self.position(), "end": self.position()},
                    "text": self.text(5)}} if self.rng.random() < 0.3 else {
                    "triggerKind": trigger}},
            "textDocument/completion": {
                "textDocument": {"uri": uri}, "position": self.position(),
                "context": {"triggerKind": self.rng.choice([1, 2, 3])}},
            "workspace/executeCommand": {
                "command": self.rng.choice(["maskfill.status", "maskfill.toggle", "nope"]),
                "arguments": self.rng.choice([None, [], [1, "x"]])},
            "initialize": {"processId": None, "rootUri": None, "capabilities": {}},
        }
        params = templates.get(method, {"textDocument": {"uri": uri}, "position": self.position()})
        return self.mutate(params) if self.rng.random() < 0.6 else params

    def notification(self) -> tuple[str, Any]:
        uri = self.rng.choice(URIS)
        kind = self.rng.random()
        if kind < 0.25:
            self._versions[uri] = 1
            return "textDocument/didOpen", {"textDocument": {
                "uri": uri, "languageId": "python", "version": 1, "text": self.text(400)}}
        if kind < 0.65:
            self._versions[uri] = self._versions.get(uri, 1) + 1
            change: dict[str, Any] = {"text": self.text(20)}
            if self.rng.random() < 0.9:
                change["range"] = {"start": self.position(), "end": self.position()}
            params = {"textDocument": {"uri": uri, "version": self._versions[uri]},
                      "contentChanges": [change]}
            return "textDocument/didChange", self.mutate(params) if kind < 0.3 else params
        if kind < 0.7:
            return "textDocument/didClose", {"textDocument": {"uri": uri}}
        if kind < 0.8:
            key = self.rng.choice(SETTING_KEYS)
            value = self.rng.choice([self.odd(), self.number(), "line", ["python"], 16])
            return "workspace/didChangeConfiguration", {"settings": {"maskfill": {key: value}}}
        if kind < 0.9:
            target = self.rng.choice(self.request_ids) if self.request_ids else 1
            return "$/cancelRequest", self.rng.choice([{"id": target}, {"id": self.odd()}])
        return self.rng.choice(["$/setTrace", "initialized", "$/unknown"]), self.odd()

    def send_one(self, server: Server) -> None:
        roll = self.rng.random()
        if roll < 0.08:
            server.send_bytes(self.rng.choice(MALFORMED))
        elif roll < 0.13:
            server.send(self.rng.choice([self.odd(), {"id": 1}, {"method": "x"}, [1, 2],
                                         {"jsonrpc": "2.0"}]))
        elif roll < 0.55:
            method = self.rng.choice(METHODS)
            self._next_id += 1
            msg_id: Any = self.rng.choice([self._next_id, f"fuzz{self._next_id}"])
            if self.rng.random() < 0.05:
                msg_id = self.rng.choice([{"x": 1}, [1], 1.5, False])  # answered with id null
            else:
                self.request_ids.append(msg_id)
            message = {"jsonrpc": "2.0", "id": msg_id, "method": method}
            if self.rng.random() < 0.95:
                message["params"] = self.request_params(method)
            server.send(message)
        else:
            method, params = self.notification()
            server.send({"jsonrpc": "2.0", "method": method, "params": params})

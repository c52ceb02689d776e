"""A hostile or broken client over stdio, against the real server (issue 11): broken frames,
invalid params, messages out of the lifecycle's order, odd ids, floods of settings. No model
is needed: the server is started with a folder that holds none (its load fails at once).

Every request must get exactly one answer, the next valid message must still be served, and
nothing may reach the client that is not a well-formed frame or that carries a traceback.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.raw_client import LIVENESS_S, Server, frame, inline_params, position

STATUS = {"command": "maskfill.status"}
INVALID_PARAMS, INVALID_REQUEST, NOT_INITIALIZED = -32602, -32600, -32002


@pytest.fixture
def server(tmp_path):
    started = Server(["--model", str(tmp_path / "no-model")], tmp_path / "stderr.log")
    yield started
    started.stop()


def assert_clean(server: Server) -> None:
    """Nothing but frames on stdout; no traceback in any answer."""
    assert server.stray == b""
    for message in server.messages:
        text = json.dumps(message)
        assert "Traceback" not in text and 'File \\"' not in text, message


def test_malformed_frames_are_dropped_and_the_next_message_is_answered(server):
    server.initialize()
    malformed = [
        b"Content-Length: 4611686018427387904\r\n\r\n",  # MemoryError in pygls' reader
        b"Content-Length: 1000000000000\r\n\r\n",
        b"Content-Length: 99999999999999999999999999\r\n\r\n",  # beyond int64: OverflowError
        b"Content-Length: 70000000\r\n\r\n",  # over the 64 MB bound: refused unread
        b"Content-Length: twelve\r\n\r\n",
        b"Content-Length: -5\r\n\r\n",
        b"Content-Length: 0\r\n\r\n",
        b"Content-Type: application/json\r\n\r\n",  # no length at all
        b"this is not a header\r\n\r\n",
    ]
    for index, data in enumerate(malformed):
        server.send_bytes(data)
        reply = server.call("workspace/executeCommand", STATUS)
        assert "result" in reply, (index, reply)
    body = json.dumps({"jsonrpc": "2.0", "id": "lower", "method": "workspace/executeCommand",
                       "params": STATUS}).encode()
    server.send_bytes(b"content-length: %d\r\n\r\n" % len(body) + body)  # lowercase: legal
    assert "result" in server.response("lower")
    body = body.replace(b'"lower"', b'"lf"')
    server.send_bytes(b"Content-Length: %d\n\n" % len(body) + body)  # LF only: accepted too
    assert "result" in server.response("lf")
    server.send_bytes(b'{"jsonrpc": "2.0"}\r\n')  # a stray line before a real header
    assert "result" in server.call("workspace/executeCommand", STATUS)

    dropped = [line for line in server.stderr().splitlines() if "dropped a malformed" in line]
    assert len(dropped) == len(malformed)  # one line each
    assert "Traceback" not in server.stderr()
    assert server.process.poll() is None
    assert_clean(server)


INLINE = "textDocument/inlineCompletion"
COMPLETION = "textDocument/completion"
URI = "file:///t.py"


def with_position(params: dict, **changes) -> dict:
    return {**params, "position": {**params["position"], **changes}}


def invalid_requests() -> list[tuple[str, object]]:
    inline = inline_params(URI, 0, 0)
    plain = {"textDocument": {"uri": URI}, "position": position(0, 0)}
    selected = {"range": {"start": position(0, -1), "end": position(0, 0)}, "text": "x"}
    without = {key: value for key, value in inline.items() if key != "context"}
    return [
        (INLINE, with_position(inline, line=-1)),
        (INLINE, with_position(inline, character=-1)),
        (INLINE, with_position(inline, line=2**31)),
        (INLINE, with_position(inline, character=2**31)),
        (INLINE, {**inline, "position": None}),
        (INLINE, {key: value for key, value in inline.items() if key != "position"}),
        (INLINE, without),
        (INLINE, {**inline, "context": {"triggerKind": 7}}),
        (INLINE, {**inline, "context": {"triggerKind": 1, "selectedCompletionInfo": selected}}),
        (INLINE, [URI, 0, 0]),
        (INLINE, None),
        (COMPLETION, with_position(plain, line=-1)),
        (COMPLETION, with_position(plain, character=2**31)),
        (COMPLETION, {**plain, "position": None}),
        (COMPLETION, {"textDocument": {"uri": URI}}),
        (COMPLETION, {**plain, "context": {"triggerKind": 7}}),
        (COMPLETION, [URI]),
        (COMPLETION, None),
    ]


def test_requests_with_invalid_params_get_invalid_params_at_once(server):
    # A client without inline completion, so that textDocument/completion is really served.
    server.initialize(capabilities={})
    server.open(URI, "def f():\n    return 1\n")
    cases = invalid_requests()
    ids = [server.request(method, params) for method, params in cases]
    # Answers come in order: once this one is here, every earlier one must be too.
    assert "result" in server.call("workspace/executeCommand", STATUS)
    for msg_id, (method, params) in zip(ids, cases, strict=True):
        replies = server.responses_to(msg_id)
        assert len(replies) == 1, (method, params, replies)
        assert replies[0]["error"]["code"] == INVALID_PARAMS, (method, params, replies)
        assert method in replies[0]["error"]["message"]
    # Well-formed positions past the end are clamped as before: an empty answer, no error.
    past_end = server.call(INLINE, inline_params(URI, 40, 7))
    assert past_end["result"] is None or past_end["result"]["items"] == []
    assert "result" in server.call(COMPLETION, {"textDocument": {"uri": URI},
                                                "position": position(0, 300)})
    assert_clean(server)


def test_lifecycle_order_is_enforced(server):
    before = server.call(COMPLETION, {"textDocument": {"uri": URI}, "position": position(0, 0)})
    assert before["error"]["code"] == NOT_INITIALIZED
    assert server.call("workspace/executeCommand", STATUS)["error"]["code"] == NOT_INITIALIZED

    server.initialize()
    server.open(URI, "def f():\n")
    again = server.call("initialize", {"processId": None, "rootUri": None, "capabilities": {}})
    assert again["error"]["code"] == INVALID_REQUEST
    # The documents opened before the refused initialize are still there: a position on
    # line 1 is inside the text (counted as a request), one on line 5 is not.
    requests = server.status()["requests"]
    server.call(INLINE, inline_params(URI, 1, 0))
    server.call(INLINE, inline_params(URI, 5, 0))
    assert server.status()["requests"] == requests + 1

    assert server.call("shutdown")["result"] is None
    for method, params in [("workspace/executeCommand", STATUS),
                           (INLINE, inline_params(URI, 1, 0))]:
        assert server.call(method, params)["error"]["code"] == INVALID_REQUEST
    server.notify("exit")
    assert server.wait_exit() == 0
    assert_clean(server)


def test_odd_ids_get_an_error_without_a_traceback(server):
    server.initialize()
    for odd in ({"a": 1}, [1], 1.5, True, None):
        server.send({"jsonrpc": "2.0", "id": odd, "method": "workspace/executeCommand",
                     "params": STATUS})
    server.send_bytes(frame("not an object")[:-1] + b"]")  # not JSON at all
    server.send({"jsonrpc": "1.0", "id": 5, "method": "shutdown"})
    assert "result" in server.call("workspace/executeCommand", STATUS)
    errors = [m for m in server.messages if "error" in m]
    assert len(errors) == 7 and all(m["id"] is None for m in errors), errors
    assert {m["error"]["code"] for m in errors} == {INVALID_REQUEST, -32700}
    assert all("data" not in m["error"] for m in errors)
    assert_clean(server)


def test_impossible_process_ids_are_ignored_with_one_warning(tmp_path):
    for pid in (2**40, 2**63, 0, -1):
        server = Server(["--model", str(tmp_path / "none"), "--parent-poll-ms", "20"],
                        tmp_path / f"stderr-{pid}.log")
        try:
            server.initialize(process_id=pid)
            server.status()
            time.sleep(0.5)  # many polls of a 20 ms watch
            server.status()
            assert server.process.poll() is None, pid  # not mistaken for a dead editor
            log = server.stderr()
            assert log.count("is not a possible process id") == 1, log
            assert "Traceback" not in log
        finally:
            server.stop()


def test_many_unknown_settings_give_one_message(server):
    unknown = {f"option{i}": i for i in range(2000)}
    server.initialize(settings={**unknown, "maxTokens": 16})
    server.status()
    server.notify("workspace/didChangeConfiguration", {"settings": {"maskfill": unknown}})
    server.status()
    messages = [m["params"]["message"] for m in server.notifications("window/showMessage")
                if "unknown" in m["params"]["message"]]
    assert len(messages) == 2, messages[:3]  # one per change, naming the keys
    assert all("2000 unknown settings" in m and "`option0`" in m for m in messages)
    assert_clean(server)


def test_protocol_fuzz_1000_cases(server):
    """1000 random messages, malformed and well-formed, mixed: the server answers every
    request that has a usable id exactly once, keeps answering, and stays clean."""
    from tests.e2e.protocol_fuzz import Fuzzer

    server.initialize()
    fuzzer = Fuzzer(seed=2024)
    for case in range(1000):
        fuzzer.send_one(server)
        if case % 100 == 99:
            assert "result" in server.call("workspace/executeCommand", STATUS, LIVENESS_S)
    assert "result" in server.call("workspace/executeCommand", STATUS)
    for msg_id in fuzzer.request_ids:
        assert len(server.responses_to(msg_id)) == 1, msg_id
    assert server.process.poll() is None
    log = server.stderr()
    assert "Traceback" not in log and " ERROR " not in log  # no failure of the server's own
    assert_clean(server)
    assert server.call("shutdown")["result"] is None
    server.notify("exit")
    assert server.wait_exit() == 0

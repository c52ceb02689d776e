"""The model's side of hardening (issue 11; issue 12.3, 12.7), over stdio with the real server:
bad input never costs the model, the queue is bounded, the first request waits for the load,
messages say why, and edits on a long non-ASCII line stay cheap.

The memorized model (tests/fixtures/memorized.py) gives real completions; the long-line test
needs no model.
"""

from __future__ import annotations

import pytest

from tests.e2e.raw_client import INLINE_CAPABILITIES, Server, inline_params
from tests.fixtures.memorized import SNIPPETS

INLINE = "textDocument/inlineCompletion"
AUTOMATIC = 2


def items(reply: dict) -> list[dict]:
    result = reply.get("result")
    return [] if result is None else result["items"]


def body_of(head: str) -> str:
    return next(s for s in SNIPPETS if s.startswith(head))[len(head):].split("\n")[0]


def test_first_request_waits_for_the_model_and_gets_a_completion(memorized_model, tmp_path):
    """Issue 12.3: a manual request sent right after `initialized`, while the model is still
    loading, is held (and the status says so), then answered from the model."""
    server = Server(["--model", str(memorized_model)], tmp_path / "stderr.log")
    try:
        server.initialize()
        server.open("file:///even.py", "def is_even(n):\n")
        reply = server.call(INLINE, inline_params("file:///even.py", 1, 0))
        texts = [item["insertText"] for item in items(reply)]
        assert body_of("def is_even(n):\n") in texts
        states = [n["params"] for n in server.notifications("maskfill/didChangeStatus")]
        assert any(s["state"] == "loading" and s.get("heldRequests") == 1 for s in states), states
    finally:
        server.stop()


def test_lone_surrogates_never_cost_the_model(memorized_model, tmp_path):
    """A document with a lone surrogate (valid JSON, no UTF-8 form) is served like any other;
    it never counts as a device failure, so the model stays where it is for everyone."""
    server = Server(["--model", str(memorized_model)], tmp_path / "stderr.log")
    try:
        server.initialize(settings={"fallbackDevice": "cuda"})
        assert server.wait_loaded()["loadState"] == "ready"
        server.open("file:///bad.py", "s = '\ud800'\ndef add(a, b):\n")
        for _ in range(6):
            server.call(INLINE, inline_params("file:///bad.py", 2, 0))
        status = server.status()
        assert status["failures"] == 0 and status["loadState"] == "ready", status
        assert status["device"] == "cpu"
        server.open("file:///even.py", "def is_even(n):\n")
        assert items(server.call(INLINE, inline_params("file:///even.py", 1, 0)))
    finally:
        server.stop()


def test_no_candidate_carries_a_broken_character(memorized_model, tmp_path):
    """A one-token span after `# é ` is the first byte of the memorized emoji: it decoded to
    U+FFFD, which the server offered. The candidate now ends before it (nothing to offer)."""
    server = Server(["--model", str(memorized_model)], tmp_path / "stderr.log")
    try:
        server.initialize(settings={"maxTokens": 1, "stopMode": "free"})
        assert server.wait_loaded()["loadState"] == "ready"
        server.open("file:///area.py", "def area(w, h):  # é ")
        for trigger in (AUTOMATIC, 1):
            reply = server.call(INLINE, inline_params("file:///area.py", 0, 21, trigger))
            assert all("\ufffd" not in item["insertText"] for item in items(reply)), reply
        assert server.status()["modelRuns"] >= 2  # the model really ran
    finally:
        server.stop()


def test_the_queue_is_bounded_across_documents(memorized_model, tmp_path):
    """30 manual requests on 30 documents, then one on a new document: the old ones are
    dropped (oldest first) instead of each running before the new one."""
    server = Server(["--model", str(memorized_model)], tmp_path / "stderr.log")
    try:
        server.initialize()
        assert server.wait_loaded()["loadState"] == "ready"
        ids = []
        for index in range(30):
            uri = f"file:///queued{index}.py"
            server.open(uri, "def clamp(x, lo, hi):\n")
            ids.append(server.request(INLINE, inline_params(uri, 1, 0)))
        server.open("file:///new.py", "def add(a, b):\n")
        newest = server.call(INLINE, inline_params("file:///new.py", 1, 0))
        assert body_of("def add(a, b):\n") in [item["insertText"] for item in items(newest)]
        for msg_id in ids:
            server.response(msg_id)
        status = server.status()
        assert status["modelRuns"] <= 10 and status["droppedJobs"] >= 20, status
    finally:
        server.stop()


def test_max_tokens_beyond_the_window_is_clamped_with_one_message(memorized_model, tmp_path):
    server = Server(["--model", str(memorized_model)], tmp_path / "stderr.log")
    try:
        server.initialize(settings={"maxTokens": 300})  # the memorized model's window: 256
        assert server.wait_loaded()["loadState"] == "ready"
        server.open("file:///even.py", "def is_even(n):\n")
        for _ in range(2):
            server.call(INLINE, inline_params("file:///even.py", 1, 0, AUTOMATIC))
            server.open("file:///even.py", "def is_even(n):\n\n")  # not from the cache
        status = server.status()
        assert status["failures"] == 0 and status["modelRuns"] == 2, status
        shown = [m["params"]["message"] for m in server.notifications("window/showMessage")
                 if "maxTokens" in m["params"]["message"]]
        assert len(shown) == 1 and "256" in shown[0], shown
    finally:
        server.stop()


@pytest.mark.parametrize("character", ["é", "中"])
def test_keystrokes_at_the_end_of_a_long_non_ascii_line_stay_cheap(tmp_path, character):
    """One keystroke at the end of a 1 M-character line cost 1.2 s (a Python loop over the
    line in pygls' position codec): 300 of them took minutes. Now each costs O(edit), so the
    answer after 300 comes within the liveness bound, and the edits landed where they should."""
    length = 1_000_000
    server = Server(["--model", str(tmp_path / "none")], tmp_path / "stderr.log")
    try:
        utf8 = {**INLINE_CAPABILITIES, "general": {"positionEncodings": ["utf-8"]}}
        server.initialize(capabilities=utf8, settings={"maxDocumentBytes": 10_000_000})
        uri = "file:///long.py"
        server.open(uri, character * length)
        column = length * len(character.encode())  # UTF-8 units, as Neovim counts
        for version in range(2, 302):
            server.change(uri, version, (0, column), (0, column), "x")
            column += 1
        before = server.status()["requests"]
        server.call(INLINE, inline_params(uri, 0, column + 1))  # past the end: refused
        server.call(INLINE, inline_params(uri, 0, column))  # the line's real end: served
        assert server.status()["requests"] == before + 1
    finally:
        server.stop()


def test_the_fallback_message_says_why_and_names_the_embedded_model(tmp_path):
    """Issue 12.7: `device: cuda` without CUDA falls back to the CPU; the message must carry
    the reason, and the log must name the embedded model (it said `loading None`)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    server = Server(["--device", "cuda"], tmp_path / "stderr.log")
    try:
        server.initialize()
        status = server.wait_loaded()
        assert status["loadState"] == "ready" and status["device"] == "cpu", status
        messages = [m["params"]["message"] for m in server.notifications("window/showMessage")]
        fallback = [m for m in messages if "fallback device cpu" in m]
        assert len(fallback) == 1 and "CUDA is not available" in fallback[0], messages
        log = server.stderr()
        assert "loading the embedded model" in log and "loading None" not in log, log
    finally:
        server.stop()

"""Streamed drafts through the real engine process and its HTTP API (`maskfill-engine serve
--http`): with `stream` and `stream_drafts`, partial fills arrive while the model denoises, each
one keeping what the one before had settled, and the stream ends with the answer a plain
request gets. A random tiny checkpoint commits about one token a step, so a 16-token span takes
many steps and gives many drafts."""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from engine.api import DRAFT_MASK
from tests.service.conftest import wait_http_ready

LOAD_S = 120.0
BODY = {"prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(1, 2))\n",
        "max_tokens": 16, "temperature": 0}


@pytest.fixture
def http_engine(slow_model: Path, serve_engine):
    """(base URL, token) of an engine serving HTTP, without the exact-request cache (each
    request below must run the model)."""
    engine = serve_engine(slow_model, "--no-socket", "--http", "127.0.0.1:0", "--cache-size", "0")
    base, token = engine.endpoints["http"], Path(engine.endpoints["token_file"]).read_text()
    wait_http_ready(base, seconds=LOAD_S)
    return base, token.strip()


def _post(base: str, token: str, path: str, body: dict,
          connection: http.client.HTTPConnection | None = None) -> http.client.HTTPResponse:
    url = urlsplit(base)
    connection = connection or http.client.HTTPConnection(url.hostname, url.port,
                                                          timeout=LOAD_S)
    connection.request("POST", path, json.dumps(body).encode(),
                       {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    return connection.getresponse()


def events(response: http.client.HTTPResponse):
    """The `data:` payloads of a server-sent event stream, as they arrive."""
    for line in response:
        line = line.strip()
        if line.startswith(b"data: "):
            payload = line[len(b"data: "):]
            yield "[DONE]" if payload == b"[DONE]" else json.loads(payload)


@pytest.mark.parametrize("path", ["/v1/fim/completions", "/v1/completions"])
def test_drafts_stream_while_the_model_denoises_and_end_with_the_plain_answer(http_engine, path):
    base, token = http_engine
    plain = _post(base, token, path, BODY)
    assert plain.status == 200
    expected = json.loads(plain.read())["choices"][0]["text"]

    streamed = _post(base, token, path, {**BODY, "stream": True, "stream_drafts": True})
    assert streamed.status == 200 and streamed.getheader("Content-Type") == "text/event-stream"
    received = list(events(streamed))
    assert received[-1] == "[DONE]"
    drafts = [e for e in received[:-1] if e["object"] == "text_completion.draft"]
    finals = [e for e in received[:-1] if e["object"] == "text_completion"]
    assert len(drafts) >= 2 and len(finals) == 1, received
    assert received[: len(drafts)] == drafts  # drafts first, then the answer
    assert finals[0]["choices"][0]["text"] == expected  # the answer a plain request gets
    assert finals[0]["choices"][0]["finish_reason"] in ("stop", "length")
    assert {e["id"] for e in received[:-1]} == {finals[0]["id"]}  # one completion's events

    steps = [d["draft"]["step"] for d in drafts]
    masked = [d["draft"]["masked"] for d in drafts]
    assert steps == sorted(set(steps)) and masked == sorted(masked, reverse=True)
    assert masked[0] > masked[-1]  # the fill progressed between the drafts shown
    for before, after in zip(drafts, drafts[1:], strict=False):
        # what the model settled from the first slot on is kept, and only grows
        assert after["choices"][0]["text"].startswith(before["choices"][0]["text"])
    for d in drafts:
        fill, shown = d["choices"][0]["fill"], d["draft"]["masked"]
        assert fill.count(DRAFT_MASK) == shown and d["draft"]["slots"] == BODY["max_tokens"]
        assert d["choices"][0]["finish_reason"] is None


def test_drafts_come_before_the_answer_is_ready(http_engine):
    """A caller that hangs up after the first draft stops a job that is still running: the
    draft was sent as it came, not held until the end."""
    base, token = http_engine
    body = {**BODY, "max_tokens": 256, "stream": True, "stream_drafts": True}
    url = urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=LOAD_S)
    response = _post(base, token, "/v1/fim/completions", body, connection)
    first = next(events(response))
    assert first["object"] == "text_completion.draft" and first["draft"]["masked"] > 0
    response.close()
    connection.close()  # the caller hangs up
    deadline = time.monotonic() + LOAD_S
    cancelled = 0.0
    while time.monotonic() < deadline and not cancelled:
        request = urllib.request.Request(base + "/metrics",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as metrics:
            for line in metrics.read().decode().splitlines():
                if line.startswith('maskfill_requests_total{outcome="cancelled"}'):
                    cancelled = float(line.split()[-1])
        time.sleep(0.05)
    assert cancelled == 1

"""The HTTP FIM API on an in-process service: Mercury Coder's request and answer shape, the
memorized text through it, clear 4xx for bad bodies, oversized bodies refused before being
read whole, the token, /health and /metrics, and a hung-up caller's job stopped."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from engine.serve.host import ServiceHost
from engine.serve.http_api import build_app
from engine.serve.server import EngineService
from tests.service.conftest import fim_answer, memorized_hole, slow_request

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 64 * 1024


def _scheduler(model) -> ServiceHost:
    import torch

    from engine.engine import Engine

    torch.set_num_threads(1)
    scheduler = ServiceHost(lambda: Engine.load(str(model)))
    assert scheduler.wait_loaded(120) and scheduler.state == "ready", scheduler.error
    return scheduler


@pytest.fixture(scope="module")
def memorized_scheduler(memorized_model):
    scheduler = _scheduler(memorized_model)
    yield scheduler
    scheduler.close()


async def _client(scheduler) -> tuple[TestClient, EngineService]:
    service = EngineService(scheduler, token=TOKEN)
    client = TestClient(TestServer(build_app(service, max_body_bytes=LIMIT)))
    await client.start_server()
    return client, service


@pytest.fixture
async def api(memorized_scheduler):
    client, service = await _client(memorized_scheduler)
    yield client
    await client.close()


async def test_fim_answers_in_mercury_shape_with_the_engines_answer(api, memorized_model):
    request, _ = memorized_hole(memorized_model, 2)
    expected = fim_answer(memorized_model, request)
    assert expected  # the memorized model writes something here
    body = {"model": "mercury-coder", "prompt": request.prefix, "suffix": request.suffix,
            "max_tokens": request.max_tokens, "temperature": 0, "top_p": 1, "n": 1}
    response = await api.post("/v1/fim/completions", json=body, headers=AUTH)
    assert response.status == 200
    data = await response.json()
    assert data["object"] == "text_completion" and data["model"] == "mercury-coder"
    assert [c["text"] for c in data["choices"]] == [expected]
    assert data["choices"][0]["index"] == 0
    assert data["choices"][0]["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_extra_chunks_reach_the_prompt_before_the_prefix(api, memorized_model):
    """issue 23: `extra` [{path|filename, text}] is laid out by the engine before the prefix
    (comment blocks for this tokenizer, which has no <|file_sep|>)."""
    import dataclasses

    from engine.api import ContextChunk

    request, _ = memorized_hole(memorized_model, 2)
    base = {"prompt": request.prefix, "suffix": request.suffix, "max_tokens": 16}
    chunks = [{"path": "util.py", "text": "x = 1"}, {"filename": "b.py", "text": "y = 2"}]
    plain = await (await api.post("/v1/fim/completions", json=base, headers=AUTH)).json()
    response = await api.post("/v1/fim/completions", json={**base, "extra": chunks},
                              headers=AUTH)
    assert response.status == 200, await response.text()
    carried = await response.json()
    assert carried["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]
    engine_request = dataclasses.replace(
        request, max_tokens=16, stop="free",
        extra=(ContextChunk("util.py", "x = 1"), ContextChunk("b.py", "y = 2")))
    assert carried["choices"][0]["text"] == fim_answer(memorized_model, engine_request)


async def test_stop_sequences_cut_the_text(api, memorized_model):
    request, _ = memorized_hole(memorized_model, 2)
    answer = fim_answer(memorized_model, request)
    assert len(answer.split()) >= 2
    word = answer.split()[1]
    body = {"prompt": request.prefix, "suffix": request.suffix,
            "max_tokens": request.max_tokens, "stop": word}
    data = await (await api.post("/v1/fim/completions", json=body, headers=AUTH)).json()
    assert data["choices"][0]["text"] == answer[: answer.index(word)]
    assert data["choices"][0]["finish_reason"] == "stop"
    body["stop"] = ["\n"]  # the engine's line mode
    data = await (await api.post("/v1/fim/completions", json=body, headers=AUTH)).json()
    assert "\n" not in data["choices"][0]["text"]


@pytest.mark.parametrize(("payload", "message"), [
    (b"{not json", "bad request body"),
    (b"[1, 2]", "Expected `object`"),
    (b'{"suffix": "x"}', "missing required field `prompt`"),
    (b'{"prompt": "x", "max_tokens": "ten"}', "$.max_tokens"),
    (b'{"prompt": "x", "max_tokens": 100000}', "$.max_tokens"),
    (b'{"prompt": "x", "temperature": -1}', "$.temperature"),
    (b'{"prompt": "x", "n": 0}', "$.n"),
    (b'{"prompt": "x", "stop": ["a", ""]}', "must not be empty"),
    (b'{"prompt": "\\ud800"}', "bad request body"),  # a lone surrogate
    (b'{"prompt": "x", "max_tokens": 300}', "does not fit the model window"),  # engine check
])
async def test_bad_bodies_get_a_400_naming_the_problem(api, payload, message):
    response = await api.post("/v1/fim/completions", data=payload,
                              headers={**AUTH, "Content-Type": "application/json"})
    assert response.status == 400
    error = (await response.json())["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


async def test_an_oversized_body_is_refused_from_its_length(api):
    body = json.dumps({"prompt": "x" * (LIMIT + 1)}).encode()
    response = await api.post("/v1/fim/completions", data=body, headers=AUTH)
    assert response.status == 413
    assert "limit" in (await response.json())["error"]["message"]


async def test_an_oversized_chunked_body_is_refused_while_streaming(api):
    sent = 0

    async def chunks():  # no Content-Length: the server must count as it reads
        nonlocal sent
        for _ in range(64):
            sent += 16 * 1024
            yield b"x" * (16 * 1024)

    response = await api.post("/v1/fim/completions", data=chunks(), headers=AUTH)
    assert response.status == 413
    assert "limit" in (await response.json())["error"]["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": TOKEN}])
async def test_a_missing_or_wrong_token_gets_401(api, headers):
    for method, path in (("POST", "/v1/fim/completions"), ("GET", "/metrics")):
        response = await api.request(method, path, json={"prompt": "x"}, headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "token" in (await response.json())["error"]["message"]


async def test_health_is_open_and_metrics_are_prometheus_text(api, memorized_model):
    health = await api.get("/health")
    assert health.status == 200 and (await health.json())["state"] == "ready"
    request, _ = memorized_hole(memorized_model, 0)
    body = {"prompt": request.prefix, "suffix": request.suffix, "max_tokens": 8}
    for _ in range(2):  # the second is an exact-cache hit
        assert (await api.post("/v1/fim/completions", json=body, headers=AUTH)).status == 200
    response = await api.get("/metrics", headers=AUTH)
    assert response.status == 200 and response.content_type == "text/plain"
    text = await response.text()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples['maskfill_request_latency_seconds_bucket{le="+Inf"}'] >= 1
    assert samples["maskfill_request_latency_seconds_count"] >= 1
    assert samples["maskfill_forward_passes_per_token"] > 0
    assert samples["maskfill_queue_depth"] == 0
    assert samples["maskfill_cache_hits_total"] >= 1
    assert samples['maskfill_resident_bytes{kind="weights"}'] > 0
    assert samples['maskfill_requests_total{outcome="ok"}'] >= 1


async def test_a_caller_that_hangs_up_stops_its_job(slow_model):
    scheduler = _scheduler(slow_model)
    client, service = await _client(scheduler)
    try:
        r = slow_request()
        body = {"prompt": r.prefix, "max_tokens": 384, "temperature": 0.5}
        post = asyncio.ensure_future(client.post("/v1/fim/completions", json=body,
                                                 headers=AUTH))
        for _ in range(3000):  # until the model thread holds it (bounded)
            if scheduler.busy:
                break
            await asyncio.sleep(0.01)
        assert scheduler.busy
        post.cancel()  # the connection closes
        for _ in range(3000):
            if scheduler.stats.outcomes["cancelled"]:
                break
            await asyncio.sleep(0.01)
        assert scheduler.stats.outcomes == {**scheduler.stats.outcomes, "cancelled": 1, "ok": 0}
        assert service.http_in_flight == 0
    finally:
        await client.close()
        scheduler.close()

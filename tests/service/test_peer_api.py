"""The API shapes peers' clients speak (issue 21.4), each tested with the body its real client
sends (tests/fixtures/peer_requests.py) and read the way that client reads the answer: Continue
and Tabby stream `/v1/completions` with `suffix`, llama.vscode and llama.vim call `/infill`.
Also: the model's name (never a path), max_tokens as a ceiling, refusals that name the field,
JSON errors on every route, and cache hits counted as requests in /metrics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from engine.api import CompletionRequest, ContextChunk, EngineInfo
from engine.serve import peer_api
from engine.serve.http_api import build_app
from engine.serve.peer_api import model_name
from engine.serve.server import EngineService
from tests.fixtures import peer_requests as peers
from tests.service.conftest import fim_answer, memorized_hole
from tests.service.test_http_api import _scheduler  # a loaded, ready ServiceHost

TOKEN = "peer-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def memorized_scheduler(memorized_model):
    scheduler = _scheduler(memorized_model)
    yield scheduler
    scheduler.close()


async def _client(scheduler, extra_routes=()) -> TestClient:
    app = build_app(EngineService(scheduler, token=TOKEN), max_body_bytes=256 * 1024)
    for method, path, handler in extra_routes:
        app.router.add_route(method, path, handler)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def api(memorized_scheduler):
    client = await _client(memorized_scheduler)
    yield client
    await client.close()


CEILING = min(peer_api.MAX_SPAN_TOKENS, 256 // 2)  # the memorized model's window is 256


@pytest.fixture(scope="module")
def hole(memorized_model):
    """(prefix, suffix, the engine's own greedy answer at the span ceiling these clients reach)."""
    request, _ = memorized_hole(memorized_model, 2)
    answer = fim_answer(memorized_model, dataclasses.replace(request, max_tokens=CEILING))
    assert answer  # the memorized model writes something here
    return request.prefix, request.suffix, answer


def streamed_text(raw: bytes) -> tuple[str, str | None]:
    """Tabby's EventSource loop (openai.rs): yield choices[0].text, stop once finish_reason is
    set or at [DONE]; every event must parse as its CompletionResponseChunk. Continue's
    streamSse reads the same field up to [DONE]."""
    text, finished = "", None
    for event in sse_events(raw):
        if event == "[DONE]":
            break
        choice = json.loads(event)["choices"][0]
        assert isinstance(choice["text"], str)
        text += choice["text"]
        if choice["finish_reason"] is not None:
            finished = choice["finish_reason"]
            break
    return text, finished


def sse_events(raw: bytes) -> list[str]:
    """The `data:` payloads of a server-sent event stream, as an EventSource reads them."""
    events = []
    for block in raw.decode().split("\n\n"):
        data = [ln[len("data:"):].strip() for ln in block.splitlines() if ln.startswith("data:")]
        if data:
            events.append("\n".join(data))
    return events


@pytest.mark.parametrize("client", [peers.continue_fim, peers.tabby_openai_completion])
async def test_continue_and_tabby_stream_fim_from_v1_completions(api, hole, client):
    prefix, suffix, answer = hole
    response = await api.post("/v1/completions", json=client(prefix, suffix), headers=AUTH)
    assert response.status == 200, await response.text()
    assert response.content_type == "text/event-stream"
    raw = await response.read()
    assert sse_events(raw)[-1] == "[DONE]"
    first = json.loads(sse_events(raw)[0])
    assert first["object"] == "text_completion" and first["model"] == "maskfill"
    text, finished = streamed_text(raw)
    assert text and finished in ("stop", "length")
    # Their temperatures (0.01, 0.1) sample; at 0 the text is the engine's own greedy answer
    # at the span budget the request reaches (Continue's 4096 lowered to the ceiling; Tabby 64).
    body = {**client(prefix, suffix), "temperature": 0}
    greedy, _ = streamed_text(await (await api.post("/v1/completions", json=body,
                                                    headers=AUTH)).read())
    if body["max_tokens"] >= CEILING:
        assert greedy == answer
    else:
        assert greedy == fim_answer_at(body["max_tokens"], prefix, suffix)


def fim_answer_at(max_tokens: int, prefix: str, suffix: str) -> str:
    from engine.api import CompletionRequest

    return fim_answer(MEMORIZED[0], CompletionRequest(prefix=prefix, suffix=suffix,
                                                      max_tokens=max_tokens, stop="free"))


MEMORIZED: list[Path] = []


@pytest.fixture(autouse=True)
def _memorized_path(memorized_model):
    MEMORIZED[:] = [memorized_model]


async def test_v1_completions_without_stream_answers_in_openai_shape(api, hole, memorized_model):
    prefix, suffix, answer = hole
    body = {**peers.continue_fim(prefix, suffix), "stream": False, "n": 2, "temperature": 0}
    del body["model"]
    response = await api.post("/v1/completions", json=body, headers=AUTH)
    assert response.status == 200
    data = await response.json()
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    assert data["choices"][0]["text"] == answer  # candidate 0 is greedy
    assert [c["index"] for c in data["choices"]] == list(range(len(data["choices"])))
    # Without `model` the answer names the model, never its folder (issue 21.4).
    assert data["model"] == memorized_model.name and "/" not in data["model"]
    assert data["usage"]["prompt_tokens"] > 0
    echo = await api.post("/v1/completions", headers=AUTH, json={
        "prompt": [prefix], "suffix": suffix, "max_tokens": 128, "echo": True})
    assert (await echo.json())["choices"][0]["text"] == prefix + answer


async def test_llama_vscode_infill_gets_several_candidates(api, hole):
    prefix, suffix, answer = hole
    response = await api.post("/infill", json=peers.llama_vscode_infill(
        prefix, suffix, t_max_predict_ms=600_000, extra=False), headers=AUTH)  # (no deadline
    # load can reach; an empty ring: the chunk's effect is test_input_extra_goes_before_...)
    assert response.status == 200, await response.text()
    data = await response.json()
    # n_cmpl 3: an array, as llama.vscode's getComplFromContent reads it (a Set of `content`).
    assert isinstance(data, list) and 1 <= len(data) <= 3
    assert data[0]["content"] == answer  # temperature not sent: candidate 0 is greedy
    assert len({d["content"] for d in data}) == len(data)
    for index, result in enumerate(data):
        assert result["index"] == index and result["stop"] is True
        timings = result["timings"]
        assert timings["prompt_n"] > 0 and timings["prompt_ms"] >= 0
        assert isinstance(result["tokens_cached"], int)
        assert result["model"] == "maskfill" or "/" not in result["model"]


async def test_llama_vim_infill_answers_the_response_fields_it_asks_for(api, hole):
    prefix, suffix, answer = hole
    response = await api.post("/infill", json=peers.llama_vim_infill(
        prefix, suffix, t_max_predict_ms=600_000, extra=False), headers=AUTH)
    assert response.status == 200, await response.text()
    data = await response.json()
    # llama-server's response_fields: flat keys by path; llama.vim reads get(r, 'timings/...').
    assert data["content"] == answer
    expected = set(peers.LLAMA_VIM_RESPONSE_FIELDS) - {"truncated"}  # not known: left out
    assert set(data) == expected, data
    assert data["timings/prompt_n"] > 0 and data["timings/predicted_n"] > 0


def test_input_extra_becomes_the_requests_extra_chunks():
    """`input_extra: [{filename, text}]` goes in CompletionRequest.extra (the engine lays it
    out with the tokenizer's repository tokens when it has them), never pasted into the
    prefix; empty chunks are left out."""
    body = peers.llama_vim_infill("def f(x):\n    ", "\n", t_max_predict_ms=600_000)
    body["input_extra"].append({"text": "  \n", "filename": "empty.py", "time": [1, 2]})
    decoded = peer_api._decode(json.dumps(body).encode(), peer_api.InfillRequest)
    request = peer_api.infill_request(decoded, ["\n"], lambda asked: 64)
    chunk = body["input_extra"][0]
    assert request.extra == (ContextChunk(chunk["filename"], peers.EXTRA_TEXT),)
    assert request.prefix == body["input_prefix"] + body["prompt"]


async def test_input_extra_goes_before_the_prefix(api, hole):
    prefix, suffix, _ = hole
    without = peers.llama_vim_infill(prefix, suffix, t_max_predict_ms=600_000, extra=False)
    extra = peers.llama_vim_infill(prefix, suffix, t_max_predict_ms=600_000)
    counts, contents = [], []
    for body in (without, extra):
        response = await api.post("/infill", json=body, headers=AUTH)
        counts.append((await response.json())["timings/prompt_n"])
        contents.append((await response.json())["content"])
    assert counts[1] > counts[0], counts  # the chunk reached the model's context ...
    # ... as the engine lays out a request's extra chunks (engine/denoise/repo_context.py; the
    # memorized model, which never saw such text, may well answer nothing after it).
    chunks = (ContextChunk(extra["input_extra"][0]["filename"], peers.EXTRA_TEXT),)
    assert contents[1] == fim_answer(MEMORIZED[0], CompletionRequest(
        prefix=prefix, suffix=suffix, max_tokens=CEILING, stop="free", top_p=extra["top_p"],
        extra=chunks))
    assert contents[0] == hole[2]


@pytest.mark.parametrize("body", [peers.llama_vim_ring_update(),
                                  peers.llama_vscode_warm_up("def f(x):\n    ", "\n")])
async def test_warm_up_requests_answer_at_once_without_a_model_run(api, memorized_scheduler,
                                                                    body):
    before = dict(memorized_scheduler.stats.outcomes)
    response = await api.post("/infill", json=body, headers=AUTH)
    assert response.status == 200, await response.text()
    data = await response.json()
    assert data.get("content", "") == ""
    assert memorized_scheduler.stats.outcomes == before


async def test_a_span_ceiling_beyond_the_window_is_lowered_not_refused(api, hole):
    prefix, suffix, answer = hole
    for path, body in (
        ("/v1/completions", {"prompt": prefix, "suffix": suffix, "max_tokens": 100_000}),
        ("/infill", {"input_prefix": prefix, "input_suffix": suffix, "n_predict": 100_000}),
    ):
        response = await api.post(path, json=body, headers=AUTH)
        assert response.status == 200, await response.text()


@pytest.mark.parametrize(("path", "extra", "field"), [
    ("/v1/completions", {"logprobs": 1}, "logprobs"),
    ("/v1/completions", {"logit_bias": {"50256": -100}}, "logit_bias"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "batch of prompts"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, "$.prompt"),
    ("/v1/completions", {"seed": 2**64}, "$.seed"),
    ("/v1/completions", {"stop": ["x"] * 40}, "at most 32"),
    ("/infill", {"lora": [{"id": 0, "scale": 0.5}]}, "lora"),
    ("/infill", {"grammar": "root ::= \"x\""}, "grammar"),
    ("/infill", {"json_schema": {"type": "object"}}, "json_schema"),
    ("/infill", {"n_probs": 5}, "n_probs"),
    ("/infill", {"n_cmpl": 9}, "$.n_cmpl"),
    ("/infill", {"input_extra": "not a list"}, "$.input_extra"),
])
async def test_options_that_matter_get_a_400_naming_them(api, path, extra, field):
    body = {"prompt": "def f(x):\n    return ", "suffix": "\n"} if path == "/v1/completions" \
        else {"input_prefix": "def f(x):\n", "prompt": "    return ", "input_suffix": "\n"}
    response = await api.post(path, json={**body, **extra}, headers=AUTH)
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert field in error["message"] and error["code"] == 400
    assert error["type"] == "invalid_request_error"


async def test_every_error_is_json(memorized_scheduler):
    async def broken(request):
        raise RuntimeError("a bug with a secret in it")

    client = await _client(memorized_scheduler, [("GET", "/broken", broken)])
    try:
        cases = [
            ("GET", "/no/such/route", AUTH, 404),
            ("GET", "/v1/completions", AUTH, 405),
            ("PUT", "/infill", AUTH, 405),
            ("POST", "/infill", {}, 401),
            ("POST", "/v1/completions", {"Authorization": "Bearer nope"}, 401),
            ("GET", "/broken", AUTH, 500),
        ]
        for method, path, headers, status in cases:
            response = await client.request(method, path, headers=headers, json={})
            assert response.status == status, (method, path, await response.text())
            assert response.content_type == "application/json", (method, path)
            error = (await response.json())["error"]
            assert error["code"] == status and error["message"]
            assert "secret" not in error["message"]
    finally:
        await client.close()


async def test_fim_completions_stream_too_and_name_the_model(api, hole, memorized_model):
    """Continue's OpenAI adapter streams /v1/fim/completions and reads chat-style chunks."""
    prefix, suffix, _ = hole
    body = {"prompt": prefix, "suffix": suffix, "max_tokens": 128, "stream": True}
    response = await api.post("/v1/fim/completions", json=body, headers=AUTH)
    assert response.status == 200 and response.content_type == "text/event-stream"
    events = sse_events(await response.read())
    assert events[-1] == "[DONE]"
    chunk = json.loads(events[0])
    choice = chunk["choices"][0]
    assert choice["delta"]["content"] == choice["text"]
    assert chunk["model"] == memorized_model.name


async def test_cache_hits_count_as_requests_in_metrics(api, hole):
    prefix, suffix, _ = hole

    async def requests_total() -> dict[str, float]:
        text = await (await api.get("/metrics", headers=AUTH)).text()
        totals = {}
        for line in text.splitlines():
            if line.startswith("maskfill_requests_total{"):
                name, _, value = line.rpartition(" ")
                totals[name.split('"')[1]] = float(value)
        return totals

    before = await requests_total()
    body = {"prompt": prefix, "suffix": suffix + "\n# metrics", "max_tokens": 16}
    for _ in range(2):  # deterministic: the second is answered from the exact-request cache
        assert (await api.post("/v1/completions", json=body, headers=AUTH)).status == 200
    after = await requests_total()
    assert after["cached"] == before.get("cached", 0) + 1
    assert sum(after.values()) == sum(before.values()) + 2


@pytest.mark.parametrize(("spec", "path", "name"), [
    ("Dream-org/Dream-Coder-v0-Base-7B", "/hf/models--Dream-org--Dream-Coder-v0-Base-7B/"
     "snapshots/abc123", "Dream-org/Dream-Coder-v0-Base-7B"),
    ("/hf/models--apple--DiffuCoder-7B-Base/snapshots/abc123",
     "/hf/models--apple--DiffuCoder-7B-Base/snapshots/abc123", "apple/DiffuCoder-7B-Base"),
    ("/home/me/checkpoints/my-dream", "/home/me/checkpoints/my-dream", "my-dream"),
    ("./my-dream", "/home/me/my-dream", "my-dream"),
])
def test_the_model_name_is_never_a_path(spec, path, name):
    info = EngineInfo(model=spec, path=path, family="dream", device="cpu", dtype="float32",
                      quant="none", weight_bytes=1, parameters=1, max_context=256, load_ms=0)
    assert model_name(info) == name


def test_the_embedded_model_is_named_not_located():
    from engine.model.embedded_model import EMBEDDED_DIR

    info = EngineInfo(model=str(EMBEDDED_DIR), path=str(EMBEDDED_DIR), family="dream",
                      device="cpu", dtype="float32", quant="none", weight_bytes=1,
                      parameters=1, max_context=384, load_ms=0)
    assert model_name(info) == "maskfill-embedded"


async def test_the_infill_deadline_is_the_clients_time_budget(slow_model):
    """t_max_prompt_ms + t_max_predict_ms bound the run: past them the answer holds what the
    model committed by then and says it stopped at the limit."""
    scheduler = _scheduler(slow_model)
    client = await _client(scheduler)
    try:
        body = peers.llama_vim_infill("def add(a, b):\n", "\n", t_max_predict_ms=1)
        body["t_max_prompt_ms"] = 1
        body["response_fields"] = None
        body["n_predict"] = 512  # lowered to the ceiling: hundreds of passes on this model
        response = await client.post("/infill", json=body, headers=AUTH)
        assert response.status == 200, await response.text()
        assert (await response.json())["stop_type"] == "limit"
        assert scheduler.stats.outcomes["timed_out"] == 1
    finally:
        await client.close()
        scheduler.close()


def test_routes_are_registered_on_the_app(memorized_scheduler):
    app = build_app(EngineService(memorized_scheduler, token=TOKEN))
    routes = {(r.method, r.resource.canonical) for r in app.router.routes()
              if isinstance(r.resource, web.Resource)}
    assert {("POST", "/v1/completions"), ("POST", "/infill"),
            ("POST", "/v1/fim/completions")} <= routes

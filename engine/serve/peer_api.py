"""The request shapes other tools' clients already send, served by the engine, token and JSON
errors of the FIM API (http_api.py):

- `POST /v1/completions`: OpenAI's completions with `suffix` (fill in the middle), as Continue's
  OpenAI-compatible FIM providers and Tabby's `openai/completion` HTTP backend send it. Both ask
  with `stream: true`: the answer then comes as server-sent events, one event per choice holding
  its whole text and finish reason, then `data: [DONE]`. With `stream_drafts: true` as well,
  the partial fills come first, as the model denoises (`text_completion.draft` events, each
  replacing the one before: draft_event), something no autoregressive peer can show.
- `GET /v1/models` (and `/v1/models/{id}`): OpenAI's model list, as Continue and Tabby ask for
  it, with the model's window (`max_model_len`, `context_length`) and span ceiling
  (`max_tokens`): how maskfill-lsp's remote mode learns the window it must fit.
- `POST /infill`: llama-server's fill-in-the-middle endpoint, as llama.vscode and llama.vim call
  it: the text before the cursor is `input_prefix` + `prompt`, after it `input_suffix`; the
  `input_extra` chunks (other files, `{filename, text}`) go in the request's `extra`, in the
  order sent (the ring's oldest first: a stable head for the K/V reuse): the engine lays them
  out before the prefix with the tokenizer's repository token (`<|file_sep|>`, as llama-server
  does for a model with FIM file tokens) or as comment blocks, within half the window, whole
  chunks only (engine/denoise/repo_context.py);
  `n_predict` is the span budget (0: a cache warm-up, answered at once without the model),
  `n_cmpl` the number of candidates (an array answers when it is over 1, as llama-server's does),
  `t_max_prompt_ms` + `t_max_predict_ms` the deadline, `response_fields` picks fields by path.

Both take `max_tokens` / `n_predict` as a ceiling, as OpenAI and llama-server do: the engine tries
at most MAX_SPAN_TOKENS (or half the model's window). Options that cannot change this engine's
answer (penalties, top_k, min_p, samplers, cache_prompt, id_slot, n_indent, best_of, user, ...)
are ignored; ones whose absence would silently change what the client asked for (a LoRA adapter,
a grammar or JSON schema, logprobs, logit_bias) get a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from aiohttp import web

from engine.api import (
    DRAFT_MASK,
    CompletionRequest,
    CompletionResult,
    ContextChunk,
    Draft,
    EngineInfo,
)
from engine.serve.draft_queue import DraftQueue
from engine.serve.fim_wire import HTTP_TIMEOUT_MS, MAX_N, ApiError, cut_at_stops, to_response

if TYPE_CHECKING:
    from engine.serve.http_api import FimApi

DEFAULT_MAX_TOKENS = 64  # when a request gives none (OpenAI's own default is 16: too short here)
MAX_SPAN_TOKENS = 256  # ceiling of max_tokens / n_predict (Continue sends 4096 by default)
MAX_STOPS = 32  # Continue sends up to 16 stop strings to an OpenAI-compatible FIM provider
MAX_STOP_CHARS = 256
MAX_EXTRA_CHUNKS = 64  # llama.vim and llama.vscode keep a ring of 16
MAX_SEED = 2**63 - 1
HF_SNAPSHOT = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$")

FIM_MAX_TOKENS = 512  # http_api.FimRequest's max_tokens bound
Seed = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)]


def model_name(info: EngineInfo | None) -> str:
    """What answers call the model: a Hugging Face repo id as given; for a folder, its repo id
    when it is a hub-cache snapshot, `maskfill-embedded` for the model shipped with maskfill, else
    the folder's name. Never a filesystem path (it says nothing to a client and leaks one)."""
    if info is None:
        return "maskfill"
    spec = info.model
    if not (Path(spec).is_absolute() or spec.startswith((".", "~")) or Path(spec).exists()):
        return spec  # a repo id
    from engine.model.embedded_model import EMBEDDED_DIR

    resolved = Path(info.path or spec).expanduser().resolve()
    if resolved == EMBEDDED_DIR:
        return "maskfill-embedded"
    if match := HF_SNAPSHOT.search(resolved.as_posix()):
        return f"{match[1]}/{match[2]}"
    return resolved.name or "maskfill"


def _error(message: str) -> ApiError:
    return ApiError(400, message)


def _stops(stop: str | list[str] | None) -> list[str]:
    strings = [stop] if isinstance(stop, str) else list(stop or [])
    if len(strings) > MAX_STOPS:
        raise _error(f"stop: at most {MAX_STOPS} sequences")
    if any(not s or len(s) > MAX_STOP_CHARS for s in strings):
        raise _error(f"stop: sequences must be 1 to {MAX_STOP_CHARS} characters")
    return strings


def _decode(raw: bytes, kind: type):
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.DecodeError as exc:
        raise _error(f"bad request body: {exc}") from None


class PeerApi:
    """The two handlers; admission, auth, body limits and the job itself are FimApi's."""

    def __init__(self, fim: FimApi):
        self.fim = fim
        self.created = int(time.time())  # OpenAI's model `created`: when this engine started

    def _ready(self):
        scheduler = self.fim.service.scheduler
        if scheduler.state != "ready":
            raise ApiError(503, f"the model is {scheduler.state}"
                           + (f": {scheduler.error}" if scheduler.error else ""), "server_error")
        return scheduler

    def _span(self, asked: int | None) -> int:
        """The span budget for a ceiling the client asked for (None: the default)."""
        return span_budget(asked, self.fim.service.scheduler.info.max_context)

    async def _run(self, request: web.Request, engine_request: CompletionRequest):
        return await self.fim._run(request, engine_request)

    # -- POST /v1/completions ------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = _decode(await self.fim.read_body(request), CompletionsRequest)
        prompt = completions_prompt(body)
        stops = _stops(body.stop)
        scheduler = self._ready()
        engine_request = completions_request(body, prompt, stops, self._span)
        name = body.model or model_name(scheduler.info)
        if body.stream and body.stream_drafts:
            return await stream_drafts(
                request, self.fim, engine_request, stops, name,
                usage=body.stream_options is not None and body.stream_options.include_usage,
                echo=prompt if body.echo else "")
        result = await self._run(request, engine_request)
        answer = completions_answer(result, stops, name, body, prompt)
        if not body.stream:
            return web.json_response(answer)
        usage = body.stream_options is not None and body.stream_options.include_usage
        return await stream_completion(request, answer, usage=usage)

    # -- GET /v1/models ------------------------------------------------------------------------

    def model_entry(self, scheduler) -> dict[str, Any]:
        """The served model in OpenAI's shape, plus its window where clients look for it
        (vLLM's max_model_len, OpenRouter's context_length) and the largest span one request
        gets (max_tokens: the FIM route's ceiling, at most half the window)."""
        return model_card(model_name(scheduler.info), scheduler.info.max_context, self.created)

    async def models(self, request: web.Request) -> web.Response:
        """What OpenAI-compatible clients (Continue's model list, Tabby's, maskfill-lsp's
        remote mode) read to learn the model's name and window."""
        return web.json_response({"object": "list", "data": [self.model_entry(self._ready())]})

    async def model(self, request: web.Request) -> web.Response:
        entry = self.model_entry(self._ready())
        if request.match_info["model"] != entry["id"]:
            raise ApiError(404, f"model {request.match_info['model']!r} is not served here "
                           f"(served: {entry['id']})", "not_found_error")
        return web.json_response(entry)

    # -- POST /infill --------------------------------------------------------------------------

    async def infill(self, request: web.Request) -> web.StreamResponse:
        body = _decode(await self.fim.read_body(request), InfillRequest)
        infill_check(body)
        stops = _stops(body.stop)
        scheduler = self._ready()
        name = body.model or model_name(scheduler.info)
        if body.n_predict == 0:  # llama.vim's and llama.vscode's warm-up: nothing to write
            return await self._infill_answer(request, body, None, name)
        result = await self._run(request, infill_request(body, stops, self._span))
        return await self._infill_answer(request, body, result, name, stops)

    async def _infill_answer(self, request: web.Request, body: InfillRequest,
                             result: CompletionResult | None, name: str,
                             stops: list[str] | None = None) -> web.StreamResponse:
        answers = infill_answers(body, result, name, stops or [])
        if body.stream:
            return await send_events(request, answers, done=False)
        return web.json_response(answers if body.n_cmpl > 1 else answers[0])


# -- transport-free pieces, shared with the Ray Serve front (engine/serve/cluster/front.py)
# ---------

Span = Callable[[int | None], int]  # the span budget for the ceiling a client asked for


def model_card(name: str, window: int, created: int) -> dict[str, Any]:
    """One entry of `GET /v1/models` (PeerApi.model_entry says what clients read in it)."""
    return {
        "id": name, "object": "model", "created": created,
        "owned_by": "maskfill", "max_model_len": window, "context_length": window,
        "max_tokens": max(1, min(FIM_MAX_TOKENS, window // 2)),
    }


def completions_prompt(body: CompletionsRequest) -> str:
    """The one prompt of a /v1/completions body, after refusing what cannot be honoured."""
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise _error("prompt: one string (a batch of prompts is not supported)")
        prompt = prompt[0]
    refused = [name for name, used in (
        ("logprobs", body.logprobs is not None), ("logit_bias", bool(body.logit_bias)),
    ) if used]
    if refused:
        raise _error(f"{', '.join(refused)}: not available from a diffusion model's "
                     "denoising; leave it out")
    return prompt


def completions_request(body: CompletionsRequest, prompt: str, stops: list[str],
                        span: Span) -> CompletionRequest:
    return CompletionRequest(
        prefix=prompt, suffix=body.suffix or "",
        max_tokens=span(body.max_tokens or body.max_completion_tokens),
        # A newline stop is the engine's line mode (shorter holes, fewer passes).
        stop="line" if "\n" in stops else "free",
        temperature=body.temperature if body.temperature is not None else 0.0,
        top_p=body.top_p if body.top_p is not None else 1.0, seed=body.seed,
        num_candidates=body.n, timeout_ms=HTTP_TIMEOUT_MS)


def completions_answer(result: CompletionResult, stops: list[str], model: str,
                       body: CompletionsRequest, prompt: str) -> dict[str, Any]:
    answer = to_response(result, stops, model)
    if body.echo:
        for choice in answer["choices"]:
            choice["text"] = prompt + choice["text"]
    return answer


def infill_check(body: InfillRequest) -> None:
    refused = [name for name, used in (
        ("lora", bool(body.lora)), ("grammar", bool(body.grammar)),
        ("json_schema", bool(body.json_schema)), ("n_probs", bool(body.n_probs)),
        ("logit_bias", bool(body.logit_bias)),
    ) if used]
    if refused:
        raise _error(f"{', '.join(refused)}: not supported by this engine; leave it out")
    if len(body.input_extra) > MAX_EXTRA_CHUNKS:
        raise _error(f"input_extra: at most {MAX_EXTRA_CHUNKS} chunks")


def infill_request(body: InfillRequest, stops: list[str], span: Span) -> CompletionRequest:
    extra = tuple(ContextChunk(chunk.filename, chunk.text) for chunk in body.input_extra
                  if chunk.text.strip())
    deadline = HTTP_TIMEOUT_MS
    if body.t_max_predict_ms and body.t_max_predict_ms > 0:
        deadline = min(HTTP_TIMEOUT_MS, body.t_max_predict_ms + max(0, body.t_max_prompt_ms))
    return CompletionRequest(
        prefix=body.input_prefix + body.prompt, suffix=body.input_suffix, extra=extra,
        max_tokens=span(body.n_predict if body.n_predict > 0 else None),
        stop="line" if "\n" in stops else "free", temperature=body.temperature,
        top_p=body.top_p, seed=body.seed if body.seed >= 0 else None,
        num_candidates=body.n_cmpl, timeout_ms=deadline)


def infill_answers(body: InfillRequest, result: CompletionResult | None, model: str,
                   stops: list[str]) -> list[dict[str, Any]]:
    """llama-server's results (None: the warm-up, answered without the model)."""
    texts = [""] if result is None else [c.text for c in result.candidates] or [result.text]
    answers = []
    for index, text in enumerate(texts[: body.n_cmpl]):
        answer = infill_answer(index, text, result, model, body, stops)
        answers.append(pick_fields(answer, body.response_fields)
                       if body.response_fields is not None else answer)
    return answers


def span_budget(asked: int | None, window: int | None) -> int:
    """The span budget for a ceiling a client asked for (None: the default), within half the
    model's window when it is known (the cluster's front knows no window: the replica fits
    the request to its model, fit_window)."""
    ceiling = min(asked or DEFAULT_MAX_TOKENS, MAX_SPAN_TOKENS)
    return max(1, ceiling if window is None else min(ceiling, window // 2))


def fit_window(request: CompletionRequest, window: int) -> CompletionRequest:
    return dataclasses.replace(request, max_tokens=min(request.max_tokens, span_budget(
        request.max_tokens, window)))


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class CompletionsRequest(msgspec.Struct, kw_only=True):
    """OpenAI's completions body; other fields (user, best_of, frequency_penalty,
    presence_penalty, ...) are accepted and ignored."""

    prompt: str | list[str]
    suffix: str | None = None
    model: str | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] = 1
    stop: str | list[str] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stream_drafts: bool = False  # with stream: partial fills as the model denoises
    echo: bool = False
    logprobs: int | None = None
    logit_bias: dict[str, float] | None = None


class ExtraChunk(msgspec.Struct, kw_only=True):
    """One `input_extra` entry: llama.vscode sends time as epoch ms, llama.vim as reltime()."""

    text: str = ""
    filename: str = ""
    time: Any = None


class InfillRequest(msgspec.Struct, kw_only=True):
    """llama-server's /infill body; other fields (top_k, min_p, samplers, cache_prompt,
    id_slot, n_indent, typical_p, repeat_penalty, ...) are accepted and ignored."""

    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = msgspec.field(default_factory=list)
    prompt: str = ""  # the cursor line's text before the cursor
    model: str | None = None
    n_predict: int = -1  # -1: up to the model (here: the default budget); 0: no generation
    n_cmpl: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] = 1
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] = 0.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    seed: Annotated[int, msgspec.Meta(ge=-MAX_SEED - 1, le=MAX_SEED)] = -1  # < 0: random
    stop: list[str] | None = None
    stream: bool = False
    t_max_prompt_ms: float = 0
    t_max_predict_ms: float = 0
    response_fields: list[str] | None = None
    lora: list[Any] | None = None
    grammar: str | None = None
    json_schema: Any = None
    n_probs: int = 0
    logit_bias: Any = None


def infill_answer(index: int, text: str, result: CompletionResult | None, model: str,
                  body: InfillRequest, stops: list[str]) -> dict[str, Any]:
    """One result in llama-server's shape (the fields llama.vim and llama.vscode read, and the
    usual others); `truncated` is left out: the engine does not report whether it cut context."""
    hits = sorted((text.find(word), word) for word in stops if word in text)
    stopping_word = hits[0][1] if hits else ""
    if hits:
        text = text[: hits[0][0]]
    s = result.stats if result is not None else None
    prompt_n = s.prefix_tokens + s.suffix_tokens if s else 0
    predicted_n = s.model_tokens if s and index == 0 else 0
    prompt_ms = s.timings_ms.get("encode", 0.0) if s else 0.0
    predicted_ms = s.timings_ms.get("denoise", 0.0) if s else 0.0
    ended = s is not None and not s.timed_out and any(
        c.ended for c in result.candidates[index:index + 1])
    return {
        "index": index,
        "content": text,
        "tokens": [],
        "id_slot": 0,
        "stop": True,
        "model": model,
        "tokens_predicted": predicted_n,
        "tokens_evaluated": prompt_n,
        "generation_settings": {
            "n_predict": body.n_predict, "temperature": body.temperature, "top_p": body.top_p,
            "seed": body.seed, "stop": stops, "n_cmpl": body.n_cmpl, "model": model,
        },
        "prompt": "",
        "has_new_line": "\n" in text,
        "stop_type": "word" if stopping_word else "eos" if ended else "limit",
        "stopping_word": stopping_word,
        "tokens_cached": s.reused_context_tokens if s else 0,
        "timings": {
            "prompt_n": prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": 1000.0 * prompt_n / prompt_ms if prompt_ms else 0.0,
            "predicted_n": predicted_n,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
            "predicted_per_second": 1000.0 * predicted_n / predicted_ms if predicted_ms else 0.0,
        },
    }


def pick_fields(answer: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """llama-server's `response_fields`: the values at these slash-separated paths, keyed by
    the path as given; a path that leads nowhere is left out."""
    picked: dict[str, Any] = {}
    for path in paths:
        value: Any = answer
        for part in path.split("/"):
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            picked[path] = value
    return picked


def completion_events(answer: dict[str, Any], *, usage: bool,
                      chat_delta: bool = False) -> list[dict[str, Any]]:
    """An OpenAI completion as server-sent event payloads: one chunk per choice with all its
    text. chat_delta: the text also as `delta.content`, for clients that read chat-style chunks
    (Continue's OpenAI adapter reads /v1/fim/completions that way). Transport-free: the Ray
    Serve front (engine/serve/cluster/front.py) streams the same events."""
    events = []
    for choice in answer["choices"]:
        choice = dict(choice)
        if chat_delta:
            choice["delta"] = {"role": "assistant", "content": choice["text"]}
        events.append({**{k: v for k, v in answer.items() if k != "usage"}, "choices": [choice]})
    if usage:
        events.append({**{k: v for k, v in answer.items() if k != "choices"}, "choices": []})
    return events


def draft_event(draft: Draft, head: dict[str, Any], stops: list[str]) -> dict[str, Any]:
    """A partial fill as a server-sent event payload (`stream_drafts`): object
    `text_completion.draft`, each one replacing the one before (they are not deltas); `text`
    is what the model has settled from the hole's first slot on (stop strings applied), `fill`
    the whole span so far with each still-masked slot as DRAFT_MASK. Transport-free, like
    completion_events."""
    text, _ = cut_at_stops(draft.text, stops)
    return {**head, "object": "text_completion.draft",
            "draft": {"step": draft.step, "masked": draft.masked, "slots": draft.slots,
                      "mask": DRAFT_MASK},
            "choices": [{"index": 0, "text": text, "fill": draft.fill, "logprobs": None,
                         "finish_reason": None}]}


def answer_head(model: str) -> dict[str, Any]:
    """id, created and model, fixed before the first draft so every event of a stream shares
    them."""
    return {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model}


def sse(event: dict[str, Any] | str) -> bytes:
    return b"data: " + (event.encode() if isinstance(event, str)
                        else msgspec.json.encode(event)) + b"\n\n"


async def stream_drafts(request: web.Request, fim: FimApi, engine_request: CompletionRequest,
                        stops: list[str], model: str, *, usage: bool, chat_delta: bool = False,
                        echo: str = "") -> web.StreamResponse:
    """`stream` with `stream_drafts`: a draft event at each of the denoising loop's host reads
    as they come, then the answer's events exactly as without drafts, then [DONE]. An engine
    error after the stream began comes as an `error` event (the status line is sent)."""
    drafts = DraftQueue()
    head = answer_head(model)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    run = asyncio.ensure_future(fim._run(request, engine_request, on_draft=drafts.put))
    try:
        async for draft in drafts.until(run):
            await response.write(sse(draft_event(draft, head, stops)))
        try:
            answer = {**to_response(run.result(), stops, model), **head}
        except ApiError as exc:
            await response.write(sse({"error": {"message": exc.message, "type": exc.kind,
                                                "code": exc.status}}))
        else:
            if echo:
                for choice in answer["choices"]:
                    choice["text"] = echo + choice["text"]
            for event in completion_events(answer, usage=usage, chat_delta=chat_delta):
                await response.write(sse(event))
            await response.write(sse("[DONE]"))
        await response.write_eof()
    except ConnectionResetError:  # the caller left: stop the model between steps
        pass
    finally:
        if not run.done():
            run.cancel()
    return response


async def stream_completion(request: web.Request, answer: dict[str, Any], *, usage: bool,
                            chat_delta: bool = False) -> web.StreamResponse:
    events = completion_events(answer, usage=usage, chat_delta=chat_delta)
    return await send_events(request, events, done=True)


async def send_events(request: web.Request, events: list[dict[str, Any]], *,
                      done: bool) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        for event in events:
            await response.write(b"data: " + msgspec.json.encode(event) + b"\n\n")
        if done:  # OpenAI's end marker; llama-server's own endpoints end at "stop": true
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:  # the caller left after asking: nothing to answer
        pass
    return response


def add_peer_routes(app: web.Application, fim: FimApi) -> None:
    peers = PeerApi(fim)
    app.router.add_post("/v1/completions", peers.completions)
    app.router.add_post("/infill", peers.infill)
    app.router.add_get("/v1/models", peers.models)
    app.router.add_get("/v1/models/{model:.+}", peers.model)

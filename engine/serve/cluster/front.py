"""`FimFront`: the HTTP FIM contract of engine/serve/http_api.py inside a Serve replica
(starlette request in, response out): `POST /v1/fim/completions` in Mercury's shape,
`GET /health`, `GET /metrics`, a Bearer token on every route but /health, clear 4xx errors
naming the field (OpenAI's error shape plus the status as `code`), bodies over the limit
refused as they stream in, `stream: true` answered as server-sent events as the shared engine
does, with `stream_drafts` the partial fills as the replica denoises; and the shared engine's
peer routes, `POST /v1/completions`, `POST /infill` and `GET /v1/models`
(engine/serve/peer_api.py's pieces).

A subclass says how a checked request reaches an engine (`dispatch`) and what /health and
/metrics report: FimIngress (ingress.py) hands it to an engine replica through a Serve handle;
DirectFimEngine (direct.py) is the engine replica itself.

Answers carry `x-maskfill-replica` (which replica answered), `x-maskfill-attempts`,
`x-maskfill-reused-tokens` (context K/V reused from an earlier request: warm when > 0) and
`x-maskfill-engine-ms` (time spent in the replica) and `x-maskfill-front-ms` (time spent in this
front, the replica's included: a caller's round trip minus it is Serve's proxy and HTTP).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from engine.api import CompletionResult
from engine.serve import peer_api
from engine.serve.cluster import contract
from engine.serve.cluster.contract import (
    FIM_PATH,
    MODELS_PATH,
    SESSION_HEADER,
    EngineAnswer,
    EngineCall,
    StreamPart,
)
from engine.serve.fim_wire import ApiError, stop_strings, to_engine_request, to_response
from engine.serve.metrics import CONTENT_TYPE
from engine.serve.peer_api import answer_head, completion_events, draft_event, model_card, sse


def error_response(exc: ApiError) -> JSONResponse:
    body = {"error": {"message": exc.message, "type": exc.kind, "code": exc.status}}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def event_stream(answer: dict, headers: dict[str, str]) -> StreamingResponse:
    """`stream: true`: the answer as the shared engine streams it (peer_api's events, then
    OpenAI's end marker)."""
    return sse_response(completion_events(answer, usage=False, chat_delta=True), headers,
                        done=True)


def metrics_response(text: bytes) -> Response:
    return Response(text, media_type=None, headers={"Content-Type": CONTENT_TYPE})


class FimFront:
    def __init__(self, *, token_digest: bytes, models: list[str], max_body_bytes: int):
        self.token_digest = token_digest
        self.served_models = list(models)
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())  # OpenAI's model `created`: when this front started

    # -- what a subclass provides --------------------------------------------------------

    async def dispatch(self, call: EngineCall, key: str | None,
                       model: str | None) -> tuple[EngineAnswer, int]:
        """Run the call on an engine: (answer, attempts it took)."""
        raise NotImplementedError

    def dispatch_stream(self, call: EngineCall, key: str | None,
                        model: str | None) -> AsyncIterator[tuple[StreamPart, int]]:
        """Run the call on an engine, its drafts then its answer as they come (with the
        attempt each came from)."""
        raise NotImplementedError

    async def health_route(self) -> Response:
        raise NotImplementedError

    async def model_infos(self) -> list[tuple[str, int]]:
        """(id, context window) of every served checkpoint, in `served_models` order."""
        raise NotImplementedError

    def metrics_route(self) -> Response:
        raise NotImplementedError

    # -- the contract ------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        try:
            path, method = route_path(request), request.method
            if path == "/health" and method == "GET":
                return await self.health_route()
            self._authorize(request)
            if path == FIM_PATH and method == "POST":
                started = time.perf_counter()
                response = await self.fim(request)
                if "x-maskfill-engine-ms" in response.headers:
                    response.headers["x-maskfill-front-ms"] = \
                        f"{(time.perf_counter() - started) * 1000.0:.2f}"
                return response
            if path == "/v1/completions" and method == "POST":
                return await self.completions(request)
            if path == "/infill" and method == "POST":
                return await self.infill(request)
            if path == "/metrics" and method == "GET":
                return self.metrics_route()
            if method == "GET" and (path == MODELS_PATH or path.startswith(MODELS_PATH + "/")):
                return await self.models(path[len(MODELS_PATH) + 1:])
            raise ApiError(404, f"no route {method} {path} (POST {FIM_PATH}, POST "
                           "/v1/completions, POST /infill, GET /v1/models, GET /health, "
                           "GET /metrics)", "not_found_error")
        except ApiError as exc:
            return error_response(exc)

    def _authorize(self, request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not contract.token_ok(self.token_digest, token.strip()):
            raise ApiError(401, "missing or wrong token (send `Authorization: Bearer <token>`; "
                           "the token is in the engine's token file)", "authentication_error",
                           {"WWW-Authenticate": "Bearer"})

    async def _read(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ApiError(413, f"body of {declared} bytes is over the "
                           f"{self.max_body_bytes}-byte limit")
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it comes: never read past the limit
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"body is over the {self.max_body_bytes}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def fim(self, request: Request) -> Response:
        body = contract.decode_body(await self._read(request))
        stops = stop_strings(body.stop)
        model = self.model_id(body.model)
        body = contract.pin_seed(body)
        key = contract.session_key(self.token_digest,
                                   request.headers.get(SESSION_HEADER) or body.session)
        call = EngineCall(request=to_engine_request(body, stops),
                          client=contract.scheduler_client(key))
        if body.stream and body.stream_drafts:
            return await self.draft_stream(
                call, key, model, stops, body.model,
                lambda result, name: completion_events(to_response(result, stops, name),
                                                       usage=False, chat_delta=True))
        answer, attempts = await self.dispatch(call, key, model)
        check_answer(answer)
        response = to_response(answer.result, stops, body.model or answer.model)
        if body.stream:  # Continue's OpenAI adapter always streams FIM
            return event_stream(response, answer_headers(answer, attempts))
        return JSONResponse(response, headers=answer_headers(answer, attempts))

    # -- the peer routes, as engine/serve/peer_api.py serves them on one machine -----------

    async def models(self, wanted: str) -> Response:
        """`GET /v1/models` (or one model, `/v1/models/{id}`) in the shared engine's shape: the
        name answers carry (with several checkpoints, the names a body's `model` picks) and
        each one's window, which maskfill-lsp's remote mode must fit."""
        cards = [model_card(name, window, self.created) for name, window in
                 await self.model_infos()]
        if not wanted:
            return JSONResponse({"object": "list", "data": cards})
        for card in cards:
            if card["id"] == wanted:
                return JSONResponse(card)
        raise ApiError(404, f"model {wanted!r} is not served here (served: "
                       f"{', '.join(c['id'] for c in cards)})", "not_found_error")

    def _peer_call(self, request: Request, engine_request) -> tuple[EngineCall, str | None]:
        key = contract.session_key(self.token_digest, request.headers.get(SESSION_HEADER))
        call = EngineCall(request=contract.pin_request_seed(engine_request),
                          client=contract.scheduler_client(key), fit_window=True)
        return call, key

    async def completions(self, request: Request) -> Response:
        body = peer_api._decode(await self._read(request), peer_api.CompletionsRequest)
        prompt = peer_api.completions_prompt(body)
        stops = peer_api._stops(body.stop)
        model = self.model_id(body.model)
        call, key = self._peer_call(request, peer_api.completions_request(
            body, prompt, stops, lambda asked: peer_api.span_budget(asked, None)))
        usage = body.stream_options is not None and body.stream_options.include_usage

        def events(result, name: str) -> list[dict]:
            answer = peer_api.completions_answer(result, stops, name, body, prompt)
            return completion_events(answer, usage=usage)

        if body.stream and body.stream_drafts:
            return await self.draft_stream(call, key, model, stops, body.model, events)
        answer, attempts = await self.dispatch(call, key, model)
        check_answer(answer)
        headers = answer_headers(answer, attempts)
        name = body.model or answer.model
        if body.stream:
            return sse_response(events(answer.result, name), headers, done=True)
        return JSONResponse(peer_api.completions_answer(answer.result, stops, name, body, prompt),
                            headers=headers)

    async def infill(self, request: Request) -> Response:
        body = peer_api._decode(await self._read(request), peer_api.InfillRequest)
        peer_api.infill_check(body)
        stops = peer_api._stops(body.stop)
        model = self.model_id(body.model)
        if body.n_predict == 0:  # the clients' warm-up: nothing to write, no replica asked
            name = body.model or model or self.served_models[0]
            return infill_response(body, peer_api.infill_answers(body, None, name, stops), {})
        call, key = self._peer_call(request, peer_api.infill_request(
            body, stops, lambda asked: peer_api.span_budget(asked, None)))
        answer, attempts = await self.dispatch(call, key, model)
        check_answer(answer)
        answers = peer_api.infill_answers(body, answer.result, body.model or answer.model, stops)
        return infill_response(body, answers, answer_headers(answer, attempts))

    async def draft_stream(self, call: EngineCall, key: str | None, model: str | None,
                           stops: list[str], asked_model: str | None,
                           finish: Callable[[CompletionResult, str], list[dict]]) -> Response:
        """`stream` + `stream_drafts`: the shared engine's events (peer_api.stream_drafts) as
        the replica sends them. The first part is awaited before answering, so an engine that
        refuses the request still gets its 4xx/5xx status."""
        parts = aiter(self.dispatch_stream(call, key, model))
        first, attempts = await anext(parts)
        if first.answer is not None:
            check_answer(first.answer)
        head = answer_head(asked_model or first.model)
        headers = {"x-maskfill-replica": first.replica, "Cache-Control": "no-cache"}

        async def events() -> AsyncIterator[bytes]:
            part = first
            try:
                while True:
                    if part.answer is None:
                        yield sse(draft_event(part.draft, head, stops))
                        part, _ = await anext(parts)
                        continue
                    check_answer(part.answer)
                    for event in finish(part.answer.result, head["model"]):
                        yield sse({**event, **head})
                    yield sse("[DONE]")
                    return
            except ApiError as exc:
                yield sse({"error": {"message": exc.message, "type": exc.kind,
                                     "code": exc.status}})
            finally:
                await parts.aclose()

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    def model_id(self, requested: str | None) -> str | None:
        """The multiplexed model id for a request: None with one checkpoint (any `model` is
        echoed, as on one engine); with several, a served name or the first by default."""
        if len(self.served_models) < 2:
            return None
        if requested is None:
            return self.served_models[0]
        if requested not in self.served_models:
            raise ApiError(400, f"model: {requested!r} is not served here (served: "
                           f"{', '.join(self.served_models)})")
        return requested


def answer_headers(answer: EngineAnswer, attempts: int) -> dict[str, str]:
    stats = answer.result.stats
    return {"x-maskfill-replica": answer.replica, "x-maskfill-attempts": str(attempts),
            "x-maskfill-reused-tokens": str(stats.reused_context_tokens),
            "x-maskfill-engine-ms": f"{answer.engine_ms:.2f}"}


def sse_response(events: list[dict], headers: dict[str, str], *, done: bool
                 ) -> StreamingResponse:
    lines = [sse(e) for e in events] + ([sse("[DONE]")] if done else [])
    return StreamingResponse(iter(lines), media_type="text/event-stream",
                             headers={**headers, "Cache-Control": "no-cache"})


def infill_response(body, answers: list[dict], headers: dict[str, str]) -> Response:
    """llama-server's answer: events without [DONE] when streamed, else one result (a list
    when n_cmpl is over 1)."""
    if body.stream:
        return sse_response(answers, headers, done=False)
    return JSONResponse(answers if body.n_cmpl > 1 else answers[0], headers=headers)


def check_answer(answer: EngineAnswer) -> None:
    """An engine's refusal or failure as the HTTP error it means."""
    if answer.error is not None:
        if answer.error.startswith("bad completion request"):
            raise ApiError(400, answer.error)
        raise ApiError(500, answer.error, "server_error")
    if answer.result is None:
        raise ApiError(503, "the request was dropped (engine shutting down)", "server_error")


def route_path(request: Request) -> str:
    """The path below the application's route prefix (Serve sets it as the root path)."""
    path, root = request.scope.get("path", "/"), request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path if path.startswith("/") else "/" + path

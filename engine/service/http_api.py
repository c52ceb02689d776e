"""HTTP front end: `POST /v1/fim/completions` in the shape of Mercury Coder's FIM API (model,
prompt, suffix, max_tokens, temperature, top_p, stop, n -> choices[].text, finish_reason,
usage), plus `GET /health` and `GET /metrics` (Prometheus text).

aiohttp parses HTTP; msgspec validates the body, so a bad field is named in a 400. A body over
the limit is refused from its Content-Length, or while it streams in, never read whole. Every
route but /health needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from aiohttp import web

from engine.api import CompletionRequest, CompletionResult, ContextChunk
from engine.service.metrics import CONTENT_TYPE, registry_for, render
from engine.service.scheduler import Job

if TYPE_CHECKING:
    from engine.service.server import EngineService

log = logging.getLogger(__name__)

HTTP_TIMEOUT_MS = 30_000.0  # the engine's deadline for one HTTP request
MAX_STOP_SEQUENCES = 8
MAX_EXTRA_CHUNKS = 64  # as /infill's input_extra
MAX_N = 8


class FimExtra(msgspec.Struct, kw_only=True):
    """A chunk of another file's code (issue 23): `path` (or llama-server's `filename`)."""

    text: str
    path: str = ""
    filename: str = ""


class FimRequest(msgspec.Struct, kw_only=True):
    """Fields other OpenAI-style clients send (user, stream=false, echo, ...) are ignored."""

    prompt: str
    suffix: str = ""
    model: str | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=512)] = 64
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] = 0.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    stop: str | list[str] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] = 1
    seed: int | None = None
    stream: bool = False
    # Other files' code, laid out before the prompt by the engine (engine/repo_context.py).
    extra: Annotated[list[FimExtra], msgspec.Meta(max_length=MAX_EXTRA_CHUNKS)] = \
        msgspec.field(default_factory=list)


class ApiError(Exception):
    """Answered by the middleware as {"error": {"message", "type"}}, OpenAI style."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def _error(status: int, message: str, kind: str = "invalid_request_error",
           **headers: str) -> ApiError:
    return ApiError(status, message, kind, headers or None)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    strings = [stop] if isinstance(stop, str) else list(stop or [])
    if len(strings) > MAX_STOP_SEQUENCES:
        raise _error(400, f"stop: at most {MAX_STOP_SEQUENCES} sequences")
    if any(not s for s in strings):
        raise _error(400, "stop: sequences must not be empty")
    return strings


def to_engine_request(body: FimRequest, stops: list[str]) -> CompletionRequest:
    # A newline stop is the engine's own line mode (shorter holes, fewer passes); any other
    # stop string is applied to the text afterwards.
    return CompletionRequest(
        prefix=body.prompt, suffix=body.suffix, max_tokens=body.max_tokens,
        stop="line" if "\n" in stops else "free", temperature=body.temperature,
        top_p=body.top_p, seed=body.seed, num_candidates=body.n, timeout_ms=HTTP_TIMEOUT_MS,
        extra=tuple(ContextChunk(c.path or c.filename, c.text) for c in body.extra),
    )


def cut_at_stops(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def to_response(result: CompletionResult, stops: list[str], model: str) -> dict[str, Any]:
    choices = []
    for index, candidate in enumerate(result.candidates):
        text, stopped = cut_at_stops(candidate.text, stops)
        ended = stopped or (candidate.ended and not result.stats.timed_out)
        choices.append({"index": index, "text": text, "logprobs": None,
                        "finish_reason": "stop" if ended else "length"})
    s = result.stats
    prompt_tokens = s.prefix_tokens + s.suffix_tokens
    return {
        "id": f"cmpl-{secrets.token_hex(12)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        # completion_tokens: what the model wrote for the top choice (the engine does not
        # count tokens per extra candidate).
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": s.model_tokens,
                  "total_tokens": prompt_tokens + s.model_tokens},
    }


class FimApi:
    def __init__(self, service: EngineService, max_body_bytes: int):
        self.service = service
        self.max_body_bytes = max_body_bytes
        self.registry = registry_for(service)
        self._job_ids = itertools.count(1)
        self._peers: dict[str, int] = {}  # one scheduler client per peer address: fair turns

    @web.middleware
    async def errors(self, request: web.Request, handler):
        """Every error is JSON, OpenAI's shape plus llama-server's numeric `code`: ours, the
        router's 404/405, aiohttp's own refusals, and a bug's 500 (logged, never echoed)."""
        try:
            return await handler(request)
        except ApiError as exc:
            status, message, kind, headers = exc.status, exc.message, exc.kind, exc.headers
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            status, message, headers = exc.status, exc.reason, None
            kind = "invalid_request_error" if exc.status < 500 else "server_error"
            if exc.status == 404:
                message = f"no route {request.path} (see the README: HTTP FIM API)"
            elif exc.status == 405:
                message = f"{request.method} is not allowed on {request.path}"
                headers = {"Allow": exc.headers.get("Allow", "")}
        except Exception:  # noqa: BLE001 - a bug must still answer in JSON
            log.exception("HTTP %s %s failed", request.method, request.path)
            status, message, kind, headers = 500, "internal error (logged)", "server_error", None
        body = {"error": {"message": message, "type": kind, "code": status}}
        return web.json_response(body, status=status, headers=headers)

    @web.middleware
    async def auth(self, request: web.Request, handler):
        if request.path != "/health":
            offered = request.headers.get("Authorization", "")
            scheme, _, token = offered.partition(" ")
            if scheme.lower() != "bearer" or not self.service.token_ok(token.strip()):
                raise _error(401, "missing or wrong token (send "
                             "`Authorization: Bearer <token>`; the token is in the engine's "
                             "token file)", "authentication_error",
                             **{"WWW-Authenticate": "Bearer"})
        return await handler(request)

    async def health(self, request: web.Request) -> web.Response:
        s = self.service.scheduler
        body = {"status": "ok" if s.state == "ready" else s.state, "state": s.state}
        return web.json_response(body, status=200 if s.state == "ready" else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=render(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def read_body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise _error(413, f"body of {request.content_length} bytes is over the "
                         f"{self.max_body_bytes}-byte limit")
        try:
            return await request.read()  # aiohttp stops reading past client_max_size
        except web.HTTPRequestEntityTooLarge:
            raise _error(413, f"body is over the {self.max_body_bytes}-byte limit") from None

    async def fim(self, request: web.Request) -> web.StreamResponse:
        from engine.service.peer_api import model_name, stream_completion

        raw = await self.read_body(request)
        try:
            body = msgspec.json.decode(raw, type=FimRequest)
        except msgspec.DecodeError as exc:
            raise _error(400, f"bad request body: {exc}") from None
        stops = stop_strings(body.stop)
        scheduler = self.service.scheduler
        if scheduler.state != "ready":
            raise _error(503, f"the model is {scheduler.state}"
                         + (f": {scheduler.error}" if scheduler.error else ""), "server_error")
        result = await self._run(request, to_engine_request(body, stops))
        answer = to_response(result, stops, body.model or model_name(scheduler.info))
        if body.stream:  # Continue's OpenAI adapter always streams FIM
            return await stream_completion(request, answer, usage=False, chat_delta=True)
        return web.json_response(answer)

    async def _run(self, request: web.Request, engine_request: CompletionRequest):
        loop = asyncio.get_running_loop()
        answer: asyncio.Future = loop.create_future()

        def reply(result, error) -> None:
            def settle() -> None:
                if not answer.done():
                    answer.set_result((result, error))
            loop.call_soon_threadsafe(settle)

        peer = request.remote or "?"
        client = self._peers.setdefault(peer, -len(self._peers) - 1)  # negative: not sockets
        job = Job(client=client, id=next(self._job_ids), request=engine_request, reply=reply)
        self.service.http_in_flight += 1
        self.service.touch()
        try:
            self.service.scheduler.submit(job)
            result, error = await answer
        except asyncio.CancelledError:  # the caller hung up: stop the model between steps
            self.service.scheduler.cancel(client, job.id)
            raise
        finally:
            self.service.http_in_flight -= 1
            self.service.touch()
        if error is not None:
            if error.startswith("bad completion request"):
                raise _error(400, error)
            raise _error(500, error, "server_error")
        if result is None:
            raise _error(503, "the request was dropped (engine shutting "
                         "down)", "server_error")
        return result


def build_app(service: EngineService, max_body_bytes: int = 1024 * 1024) -> web.Application:
    api = FimApi(service, max_body_bytes)
    app = web.Application(client_max_size=max_body_bytes, middlewares=[api.errors, api.auth])
    app.router.add_post("/v1/fim/completions", api.fim)
    from engine.service.peer_api import add_peer_routes  # (it imports this module)

    add_peer_routes(app, api)  # /v1/completions, /infill
    app.router.add_get("/health", api.health)
    app.router.add_get("/metrics", api.metrics)
    return app


async def start_http(service: EngineService, host: str, port: int, *,
                     max_body_bytes: int) -> tuple[web.AppRunner, str]:
    """Serve the app; returns the runner (to clean up) and the base URL actually bound."""
    runner = web.AppRunner(build_app(service, max_body_bytes), handler_cancellation=True,
                           access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    if ":" in bound_host:
        bound_host = f"[{bound_host}]"
    return runner, f"http://{bound_host}:{bound_port}"


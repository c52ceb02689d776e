"""`FimIngress`: the cluster's HTTP front, the same contract as the shared engine's HTTP API
(engine/service/http_api.py): `POST /v1/fim/completions` in Mercury's shape, `GET /health`,
`GET /metrics`, a Bearer token on every route but /health, clear 4xx errors naming the field.

Each request goes to an engine replica through a Serve handle, keyed by its session
(`x-session-id` header or `session` body field) for SessionAffinityRouter. A request whose
replica dies while serving it (or before) is sent once more and the router picks another
replica: FIM is deterministic for greedy decoding and sampled requests carry a seed fixed
before the first try, so the answer is the one the dead replica would have given. A caller
that hangs up cancels the request on the replica (the engine stops between steps).

Answers carry `x-maskfill-replica` (which replica answered), `x-maskfill-attempts`,
`x-maskfill-reused-tokens` (context K/V reused from an earlier request: warm when > 0) and
`x-maskfill-engine-ms` (time spent in the replica).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.cluster import contract
from engine.cluster.contract import FIM_PATH, SESSION_HEADER, EngineAnswer, EngineCall
from engine.cluster.metrics import render
from engine.cluster.registry import replica_stats, router_counters
from engine.service.http_api import ApiError, stop_strings, to_engine_request, to_response
from engine.service.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)

ATTEMPTS = 2  # the first try and one retry on another replica
HEALTH_TIMEOUT_S = 10.0


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"message": exc.message, "type": exc.kind}},
                        status_code=exc.status, headers=exc.headers)


class FimIngress:
    def __init__(self, engine: DeploymentHandle, *, token_digest: bytes, models: list[str],
                 max_body_bytes: int = 1024 * 1024):
        from ray import serve

        self.engine = engine
        self.token_digest = token_digest
        self.models = list(models)
        self.max_body_bytes = max_body_bytes
        self.multiplexed = len(self.models) > 1
        context = serve.get_replica_context()
        self.app_name = context.app_name
        self.engine_deployment = engine.deployment_name
        self.retries = 0

    async def __call__(self, request: Request) -> Response:
        try:
            path, method = _route_path(request), request.method
            if path == "/health" and method == "GET":
                return await self.health()
            self._authorize(request)
            if path == FIM_PATH and method == "POST":
                return await self.fim(request)
            if path == "/metrics" and method == "GET":
                return self.metrics()
            raise ApiError(404, f"no route {method} {path} (POST {FIM_PATH}, GET /health, "
                           "GET /metrics)", "not_found_error")
        except ApiError as exc:
            return _error(exc)

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
        if body.stream:
            raise ApiError(400, "stream: streaming is not supported; send stream=false")
        stops = stop_strings(body.stop)
        model = self._model(body.model)
        body = contract.pin_seed(body)
        key = contract.session_key(self.token_digest,
                                   request.headers.get(SESSION_HEADER) or body.session)
        call = EngineCall(request=to_engine_request(body, stops),
                          client=contract.scheduler_client(key))
        answer, attempts = await self._complete(call, key, model)
        if answer.error is not None:
            if answer.error.startswith("bad completion request"):
                raise ApiError(400, answer.error)
            raise ApiError(500, answer.error, "server_error")
        if answer.result is None:
            raise ApiError(503, "the request was dropped (engine shutting down)",
                           "server_error")
        stats = answer.result.stats
        headers = {"x-maskfill-replica": answer.replica, "x-maskfill-attempts": str(attempts),
                   "x-maskfill-reused-tokens": str(stats.reused_context_tokens),
                   "x-maskfill-engine-ms": f"{answer.engine_ms:.2f}"}
        return JSONResponse(to_response(answer.result, stops, body.model or answer.model),
                            headers=headers)

    def _model(self, requested: str | None) -> str | None:
        """The multiplexed model id for a request: None with one checkpoint (any `model` is
        echoed, as on one engine); with several, a served name or the first by default."""
        if not self.multiplexed:
            return None
        if requested is None:
            return self.models[0]
        if requested not in self.models:
            raise ApiError(400, f"model: {requested!r} is not served here (served: "
                           f"{', '.join(self.models)})")
        return requested

    async def _complete(self, call: EngineCall, key: str | None,
                        model: str | None) -> tuple[EngineAnswer, int]:
        payload = msgspec.msgpack.encode(call)
        options: dict[str, Any] = {}
        if key:
            options["session_id"] = key
        if model:
            options["multiplexed_model_id"] = model
        handle = self.engine.options(**options) if options else self.engine
        for attempt in range(1, ATTEMPTS + 1):
            try:
                raw = await handle.complete.remote(payload)
                return msgspec.msgpack.decode(raw, type=EngineAnswer), attempt
            except RayActorError as exc:  # the replica died (or is unreachable)
                if attempt == ATTEMPTS:
                    raise ApiError(503, "the engine replicas serving this request died "
                                   f"({ATTEMPTS} tries); retry shortly", "server_error") from None
                self.retries += 1
                log.warning("engine replica lost mid-request, sending it again: %s",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            except RayTaskError as exc:  # the replica raised: a model that did not load
                raise ApiError(503, f"the engine could not serve this request: "
                               f"{_cause(exc)}", "server_error") from None
        raise AssertionError("unreachable")

    async def health(self) -> Response:
        """One round trip to an engine replica: 200 once one can answer."""
        try:
            replica = await asyncio.wait_for(self.engine.health.remote(), HEALTH_TIMEOUT_S)
        except (asyncio.TimeoutError, RayActorError, RayTaskError) as exc:
            body = {"status": "unavailable", "state": "unavailable",
                    "error": f"no engine replica answered: {type(exc).__name__}"}
            return JSONResponse(body, status_code=503)
        states = set(replica["models"].values()) or {"loading"}
        state = "ready" if "ready" in states else sorted(states)[0]
        replicas = len(replica_stats(self.app_name, self.engine_deployment))
        body = {"status": "ok" if state == "ready" else state, "state": state,
                "replicas": replicas}
        return JSONResponse(body, status_code=200 if state == "ready" else 503)

    def metrics(self) -> Response:
        ingress = {"retries": self.retries,
                   "routed": router_counters(self.app_name, self.engine_deployment)}
        text = render(replica_stats(self.app_name, self.engine_deployment), ingress)
        return Response(text, media_type=None, headers={"Content-Type": CONTENT_TYPE})


def _route_path(request: Request) -> str:
    """The path below the application's route prefix (Serve sets it as the root path)."""
    path, root = request.scope.get("path", "/"), request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path if path.startswith("/") else "/" + path


def _cause(exc: RayTaskError) -> str:
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__

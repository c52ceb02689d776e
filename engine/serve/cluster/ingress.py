"""`FimIngress`: the cluster's HTTP front (front.py's contract) in front of the engine
replicas, reached through a Serve handle keyed by the request's session for
SessionAffinityRouter.

A request whose replica dies while serving it (or before) is sent once more and the router
picks another replica: FIM is deterministic for greedy decoding and sampled requests carry a
seed fixed before the first try, so the answer is the one the dead replica would have given.
A caller that hangs up cancels the request on the replica (the engine stops between steps).

Handle calls go over Serve's inter-deployment gRPC (`_by_reference=False`), not Ray actor calls:
the request and answer are small msgpack bytes, so passing them by value skips the object
store and Ray's task submission, and the accept/reject reply that Serve's router waits for
comes as the call's initial metadata instead of a first streamed item. That halved the handle
hop (docs/LOG.md, "issue 24: router overhead"). Serve starts that gRPC server in every replica
whatever the caller picks, so nothing new listens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import msgspec
from grpc.aio import AioRpcError
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle
from starlette.responses import JSONResponse, Response

from engine.serve.cluster.contract import EngineAnswer, EngineCall, StreamPart
from engine.serve.cluster.front import FimFront, metrics_response
from engine.serve.cluster.metrics import render
from engine.serve.cluster.registry import replica_stats, router_counters
from engine.serve.fim_wire import ApiError

log = logging.getLogger(__name__)

ATTEMPTS = 2  # the first try and one retry on another replica
HEALTH_TIMEOUT_S = 10.0
# A replica that died or cannot be reached. Over gRPC Serve raises ActorUnavailableError (a
# RayActorError) for UNAVAILABLE; any other transport failure (the connection reset under a
# call) comes as the raw AioRpcError. The replica's own exceptions come as RayTaskError.
REPLICA_LOST = (RayActorError, AioRpcError)
# gRPC codes that say the call itself is wrong (too big, refused), not that the replica is
# gone: another replica would answer the same, so they are not sent again.
CALL_REFUSED = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS})


class FimIngress(FimFront):
    def __init__(self, engine: DeploymentHandle, *, token_digest: bytes, models: list[str],
                 max_body_bytes: int = 1024 * 1024):
        from ray import serve

        super().__init__(token_digest=token_digest, models=models,
                         max_body_bytes=max_body_bytes)
        self.engine = engine.options(_by_reference=False)  # gRPC (module docstring)
        self.app_name = serve.get_replica_context().app_name
        self.engine_deployment = engine.deployment_name
        self.retries = 0

    def _handle(self, key: str | None, model: str | None, **options: Any) -> DeploymentHandle:
        if key:
            options["session_id"] = key
        if model:
            options["multiplexed_model_id"] = model
        return self.engine.options(**options) if options else self.engine

    async def dispatch_stream(self, call: EngineCall, key: str | None,
                              model: str | None) -> AsyncIterator[tuple[StreamPart, int]]:
        """The replica's parts as they come. A replica that dies mid-stream: the call is sent
        once more and only its answer is passed on (its drafts would start over)."""
        payload = msgspec.msgpack.encode(call)
        handle = self._handle(key, model, stream=True)
        shown = False  # drafts passed on: a second try's would start over, so it gives none
        for attempt in range(1, ATTEMPTS + 1):
            parts, ended = handle.complete_stream.remote(payload), False
            try:
                async for raw in parts:
                    part = msgspec.msgpack.decode(raw, type=StreamPart)
                    if part.answer is not None or attempt == 1 or not shown:
                        shown |= part.draft is not None
                        yield part, attempt
                ended = True
                return
            except REPLICA_LOST as exc:
                self._replica_lost(attempt, exc, "mid-stream")
            except RayTaskError as exc:
                raise ApiError(503, f"the engine could not serve this request: "
                               f"{_cause(exc)}", "server_error") from None
            finally:  # a caller that hung up: the replica stops the model between steps
                if not ended:
                    parts.cancel()

    def _replica_lost(self, attempt: int, exc: Exception, when: str) -> None:
        """A replica died under a request: send it again, or give up after ATTEMPTS tries."""
        if isinstance(exc, AioRpcError) and exc.code() in CALL_REFUSED:
            raise ApiError(503, f"the engine replica refused the call (gRPC {exc.code().name}: "
                           f"{exc.details()})", "server_error") from None
        if attempt == ATTEMPTS:
            raise ApiError(503, "the engine replicas serving this request died "
                           f"({ATTEMPTS} tries); retry shortly", "server_error") from None
        self.retries += 1
        log.warning("engine replica lost %s, sending it again: %s", when,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    async def dispatch(self, call: EngineCall, key: str | None,
                       model: str | None) -> tuple[EngineAnswer, int]:
        payload = msgspec.msgpack.encode(call)
        handle = self._handle(key, model)
        for attempt in range(1, ATTEMPTS + 1):
            try:
                raw = await handle.complete.remote(payload)
                return msgspec.msgpack.decode(raw, type=EngineAnswer), attempt
            except REPLICA_LOST as exc:  # the replica died (or is unreachable)
                self._replica_lost(attempt, exc, "mid-request")
            except RayTaskError as exc:  # the replica raised: a model that did not load
                raise ApiError(503, f"the engine could not serve this request: "
                               f"{_cause(exc)}", "server_error") from None
        raise AssertionError("unreachable")

    async def health_route(self) -> Response:
        """One round trip to an engine replica: 200 once one can answer."""
        try:
            replica = await asyncio.wait_for(self.engine.health.remote(), HEALTH_TIMEOUT_S)
        except (asyncio.TimeoutError, RayTaskError, *REPLICA_LOST) as exc:
            body = {"status": "unavailable", "state": "unavailable",
                    "error": f"no engine replica answered: {type(exc).__name__}"}
            return JSONResponse(body, status_code=503)
        replicas = len(replica_stats(self.app_name, self.engine_deployment))
        return health_answer(replica["models"], replicas)

    async def model_infos(self) -> list[tuple[str, int]]:
        """One engine replica's answer per checkpoint (several: each asked as a request for it
        would be, loading it there if no replica holds it yet); a replica that dies meanwhile
        is asked once more."""
        async def info(model: str | None) -> tuple[str, int]:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    name, window = await self._handle(None, model).model_info.remote()
                    return model or name, window
                except REPLICA_LOST as exc:
                    self._replica_lost(attempt, exc, "answering /v1/models")
                except RayTaskError as exc:
                    raise ApiError(503, f"the engine could not list its model: {_cause(exc)}",
                                   "server_error") from None
            raise AssertionError("unreachable")

        if len(self.served_models) < 2:
            return [await info(None)]
        # One at a time: handle calls made from one HTTP request share its internal request
        # id, and two such calls in flight at once were never answered (Serve 2.60 matches
        # routed requests by that id).
        return [await info(m) for m in self.served_models]

    def metrics_route(self) -> Response:
        ingress = {"retries": self.retries,
                   "routed": router_counters(self.app_name, self.engine_deployment)}
        return metrics_response(render(replica_stats(self.app_name, self.engine_deployment),
                                       ingress))


def health_answer(models: dict[str, str], replicas: int) -> JSONResponse:
    """/health's body from one replica's model states: 200 once a model is ready."""
    states = set(models.values()) or {"loading"}
    state = "ready" if "ready" in states else sorted(states)[0]
    body = {"status": "ok" if state == "ready" else state, "state": state, "replicas": replicas}
    return JSONResponse(body, status_code=200 if state == "ready" else 503)


def _cause(exc: RayTaskError) -> str:
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__

"""`DirectFimEngine`: an engine replica that is also the HTTP ingress (front.py's contract),
for the low-latency topology: one hop less than ingress -> engine.

Behind Serve's HAProxy ingress, HAProxy itself hashes `x-session-id` onto the replicas
(app.haproxy_env). What it gives up against the routed topology (app.py): no load guard (a
hash keeps a session home however busy that replica is; HAProxy's map-based hash also moves
sessions when the replica count changes), no `session` body field (HAProxy reads headers),
one checkpoint only, and no retry on another replica: a request in flight on a replica that
dies is lost (HAProxy's `retry-on empty-response` did not replay it when we measured,
docs/LOG.md). /metrics shows the replica that answered the scrape, not the sum.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from starlette.responses import Response

from engine.serve.cluster.contract import EngineAnswer, EngineCall, StreamPart
from engine.serve.cluster.front import FimFront, metrics_response
from engine.serve.cluster.ingress import health_answer
from engine.serve.cluster.metrics import render
from engine.serve.cluster.replica import FimEngine


class DirectFimEngine(FimFront, FimEngine):
    def __init__(self, models: dict[str, str], *, token_digest: bytes,
                 max_body_bytes: int = 1024 * 1024, **engine_options):
        if len(models) != 1:
            raise ValueError("the direct topology serves one checkpoint")
        FimEngine.__init__(self, models, **engine_options)
        FimFront.__init__(self, token_digest=token_digest, models=list(models),
                          max_body_bytes=max_body_bytes)

    async def dispatch(self, call: EngineCall, key: str | None,
                       model: str | None) -> tuple[EngineAnswer, int]:
        return await self.answer(call), 1

    async def dispatch_stream(self, call: EngineCall, key: str | None,
                              model: str | None) -> AsyncIterator[tuple[StreamPart, int]]:
        async for raw in self.complete_stream(msgspec.msgpack.encode(call)):
            yield msgspec.msgpack.decode(raw, type=StreamPart), 1

    async def health_route(self) -> Response:
        return health_answer((await self.health())["models"], 1)

    async def model_infos(self) -> list[tuple[str, int]]:
        return [await self.model_info()]

    def metrics_route(self) -> Response:
        return metrics_response(render({self.replica: self.record_routing_stats()}, {}))

"""`SessionAffinityRouter`: Ray Serve's request-router hook around affinity.SessionAffinity.

Serve (2.60, alpha API) asks `choose_replicas` for ranked lists of replicas; it sends the
request to the first rank's replica with room (`max_ongoing_requests`), else tries the next
rank. We rank the affinity choice first and the others after it, so a full replica spills
within the same routing round; `on_request_routed` records where the request really went.
Requests that name a model (multiplexing) choose among the replicas that hold it.

Routers live in every process holding a handle to the engine deployment (the ingress
replicas); each registers itself in registry.py, where the ingress reads the replicas'
published stats for /metrics.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import (
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from engine.serve.cluster import registry
from engine.serve.cluster.affinity import SessionAffinity


class SessionAffinityRouter(MultiplexMixin, RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self.affinity = SessionAffinity(**kwargs)
        self.reasons: dict[str, int] = {}
        registry.ROUTERS.add(self)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        metadata = pending_request.metadata if pending_request is not None else None
        if metadata is not None and metadata.multiplexed_model_id:
            holding = {rid.unique_id for rid in self.apply_multiplex_routing(pending_request)}
            by_id = {k: r for k, r in by_id.items() if k in holding} or by_id
        cache = self.replica_queue_len_cache
        session = metadata.session_id if metadata is not None else None
        choice = self.affinity.choose(
            session, list(by_id), lambda key: cache.get(by_id[key].replica_id))
        if metadata is None or metadata.call_method in ("complete", "complete_stream"):
            self.reasons[choice.reason] = self.reasons.get(choice.reason, 0) + 1
        first = by_id[choice.replica]
        rest = [r for r in candidate_replicas if r is not first]
        return [[first], rest] if rest else [[first]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        session = pending_request.metadata.session_id
        if session:
            self.affinity.place(session, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.affinity.forget_replica(replica_id.unique_id)

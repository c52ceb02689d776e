"""`SessionAffinityRouter`: Ray Serve's request-router hook around affinity.SessionAffinity.

Serve (2.60, alpha API) asks `choose_replicas` for ranked lists of replicas; it sends the
request to the first rank's replica with room (`max_ongoing_requests`), else tries the next
rank. We rank the affinity choice first and the others after it, so a full replica spills
within the same routing round; `on_request_routed` records where the request really went.
Requests that name a model (multiplexing) choose among the replicas that hold it.

The load a choice weighs is the larger of Serve's queue-length cache and this router's own
count of what it sent: requests chosen and not yet accepted, and accepted ones not yet finished.
Serve's cache alone lags: it is raised when a request is sent but then overwritten by each
replica's answer of how busy it was when that request arrived, so under a burst (or a slow
machine) it reads low and a flooding session would never reach the load bound.

Routers live in every process holding a handle to the engine deployment (the ingress
replicas); each registers itself in registry.py, where the ingress reads the replicas'
published stats for /metrics.
"""

from __future__ import annotations

import time
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

RESERVATION_TTL_S = 30.0  # a choice never accepted (the send failed) stops counting then


class SessionAffinityRouter(MultiplexMixin, RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self.affinity = SessionAffinity(**kwargs)
        self.reasons: dict[str, int] = {}
        self.running: dict[str, int] = {}  # replica -> accepted requests not finished
        self._chosen: dict[str, tuple[str, float]] = {}  # request id -> (replica, when)
        registry.ROUTERS.add(self)

    def load(self, replica: RunningReplica) -> int:
        """Requests on `replica` as far as this router knows (module docstring)."""
        key = replica.replica_id.unique_id
        mine = self.running.get(key, 0) + sum(r == key for r, _ in self._chosen.values())
        return max(mine, self.replica_queue_len_cache.get(replica.replica_id) or 0)

    def _forget_old_choices(self) -> None:
        old = time.monotonic() - RESERVATION_TTL_S
        for request_id in [k for k, (_, at) in self._chosen.items() if at < old]:
            del self._chosen[request_id]

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
        self._forget_old_choices()
        session = metadata.session_id if metadata is not None else None
        choice = self.affinity.choose(session, list(by_id), lambda key: self.load(by_id[key]))
        if metadata is None or metadata.call_method in ("complete", "complete_stream"):
            self.reasons[choice.reason] = self.reasons.get(choice.reason, 0) + 1
        if metadata is not None:  # counted until Serve says where it went (a retry replaces it)
            self._chosen[metadata.internal_request_id] = (choice.replica, time.monotonic())
        first = by_id[choice.replica]
        rest = [r for r in candidate_replicas if r is not first]
        return [[first], rest] if rest else [[first]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: Any) -> None:
        metadata = pending_request.metadata
        self._chosen.pop(metadata.internal_request_id, None)
        key = replica_id.unique_id
        self.running[key] = self.running.get(key, 0) + 1
        loop = self._event_loop

        def finished(_) -> None:  # on whichever thread the result completes
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._finished, key)

        result.add_done_callback(finished)
        if metadata.session_id:
            self.affinity.place(metadata.session_id, key)

    def _finished(self, key: str) -> None:
        left = self.running.get(key, 0) - 1
        if left > 0:
            self.running[key] = left
        else:
            self.running.pop(key, None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.affinity.forget_replica(replica_id.unique_id)
        self.running.pop(replica_id.unique_id, None)

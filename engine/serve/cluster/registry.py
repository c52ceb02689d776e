"""The session routers living in this process, for the ingress's /metrics and /health; and
the replicas' process ids, for tests and the bench (which kill one).

Serve ships a router class to each process by value (cloudpickle), so router.py's own module
globals are per copy; this module is imported normally, hence shared by every copy."""

from __future__ import annotations

import weakref
from typing import Any

ROUTERS: weakref.WeakSet = weakref.WeakSet()


def _routers(app_name: str, deployment: str) -> list:
    return [r for r in list(ROUTERS)
            if r._deployment_id.app_name == app_name and r._deployment_id.name == deployment]


def replica_stats(app_name: str, deployment: str) -> dict[str, dict[str, Any]]:
    """The stats each live replica of `deployment` last published (record_routing_stats),
    by replica id, as this process's routers see them ({} before the first request)."""
    out: dict[str, dict[str, Any]] = {}
    for router in _routers(app_name, deployment):
        for replica_id, replica in router.curr_replicas.items():
            out[replica_id.unique_id] = dict(replica.routing_stats or {})
    return out


def router_counters(app_name: str, deployment: str) -> dict[str, int]:
    """Routing decisions by reason (home, remembered, spill, two-choice), summed."""
    out: dict[str, int] = {}
    for router in _routers(app_name, deployment):
        for reason, count in router.reasons.items():
            out[reason] = out.get(reason, 0) + count
    return out


def replica_pids(app_name: str, deployment: str = "FimEngine",
                 timeout_s: float = 30.0) -> dict[str, int]:
    """Replica id -> process id of the running replicas (tests and the bench kill one):
    `health` calls through a handle until every running replica has answered once."""
    import time

    from ray import serve
    from ray.exceptions import RayActorError

    handle = serve.get_deployment_handle(deployment, app_name=app_name)
    # A driver without an event loop needs Serve's router thread, whatever
    # RAY_SERVE_THROUGHPUT_OPTIMIZED says (it moves routers onto the caller's loop).
    if handle._router is None:  # (get_deployment_handle may give one already in use)
        handle._init(_run_router_in_separate_loop=True)
    deadline = time.monotonic() + timeout_s
    pids: dict[str, int] = {}
    while time.monotonic() < deadline:
        running = serve.status().applications[app_name].deployments[deployment]
        try:
            answer = handle.health.remote().result(timeout_s=timeout_s)
        except RayActorError:  # a replica that just died: the router drops it
            continue
        pids[answer["replica"]] = answer["pid"]
        if len(pids) >= running.replica_states.get("RUNNING", 0):
            break
    return pids

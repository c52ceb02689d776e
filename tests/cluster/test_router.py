"""SessionAffinityRouter inside Serve's own RequestRouter base (no cluster): the load it weighs
counts the requests it sent, so a burst of one session spills even while the replicas' reports
of their queues arrive late and low (what Serve's queue-length cache alone then says).

Ray is imported inside the test: it reads its auth mode at first import (conftest.py)."""

from __future__ import annotations

import asyncio
import importlib.util
from types import SimpleNamespace

import pytest

if importlib.util.find_spec("ray") is None:
    pytest.skip("the `cluster` extra (ray[serve]) is not installed", allow_module_level=True)


class Result:
    """Stands for Serve's ReplicaResult: only its done-callbacks are used."""

    def __init__(self):
        self.callbacks = []

    def add_done_callback(self, callback) -> None:
        self.callbacks.append(callback)

    def finish(self) -> None:
        for callback in self.callbacks:
            callback(self)


def test_a_burst_spills_although_the_replicas_report_their_queues_late():
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

    from engine.serve.cluster.router import SessionAffinityRouter

    async def main() -> None:
        deployment = DeploymentID(name="FimEngine", app_name="test")
        router = SessionAffinityRouter(deployment_id=deployment,
                                       handle_source=DeploymentHandleSource.UNKNOWN,
                                       use_replica_queue_len_cache=True)
        router.initialize_state(abs_slack=4, rel_slack=1.5)
        replicas = [SimpleNamespace(replica_id=ReplicaID(unique_id=u, deployment_id=deployment))
                    for u in ("r0", "r1")]
        placed, results = [], []
        for i in range(8):  # one session's requests, each still running when the next comes
            request = SimpleNamespace(metadata=SimpleNamespace(
                session_id="flood", multiplexed_model_id="", call_method="complete",
                internal_request_id=f"req-{i}"))
            ranks = await router.choose_replicas(replicas, request)
            chosen = ranks[0][0].replica_id
            router.on_send_request(chosen)  # as Serve does once it sent the request
            # The replica's accept answer says how busy it was when the request arrived:
            # under a burst, late and low (here: always 1), and it overwrites Serve's cache.
            router.on_new_queue_len_info(chosen, 1)
            result = Result()
            router.on_request_routed(request, chosen, result)
            placed.append(chosen.unique_id)
            results.append(result)
        home = placed[0]
        assert placed[:5] == [home] * 5  # up to the bound (min + max(4, 1.5 x mean))
        assert placed[5] != home  # then the least loaded replica takes the session ...
        assert placed[6:] == [placed[5]] * 2  # ... and keeps it
        assert router.reasons.get("spill") == 1
        assert router.running == {home: 5, placed[5]: 3}
        for result in results:  # finished requests stop counting
            result.finish()
        await asyncio.sleep(0)
        assert router.running == {}

    asyncio.run(main())

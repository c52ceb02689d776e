"""FimIngress's retry without a cluster: over Serve's gRPC handle calls a replica that goes away
can surface as a raw gRPC error (not only Ray's actor errors); that is a lost replica too, so
the request is sent once more, and after the last try the caller gets a clear 503.

Ray is imported inside the tests: it reads its auth mode at first import (conftest.py)."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

if importlib.util.find_spec("ray") is None:
    pytest.skip("the `cluster` extra (ray[serve]) is not installed", allow_module_level=True)


class LostReplicaHandle:
    """Stands for the engine deployment's handle: every call fails as a gRPC call whose
    connection was reset under it (the replica's process gone)."""

    def __init__(self, code):
        self.code = code
        self.calls = 0
        self.complete = self

    def options(self, **_options):
        return self

    def remote(self, _payload):
        from grpc.aio import AioRpcError, Metadata

        self.calls += 1

        async def fail():
            raise AioRpcError(self.code, Metadata(), Metadata(), details="Socket closed")

        return fail()


@pytest.mark.parametrize("code_name", ["UNKNOWN", "CANCELLED", "INTERNAL"])
def test_a_raw_grpc_failure_is_a_lost_replica_sent_once_more_then_503(code_name):
    import grpc

    from engine.api import CompletionRequest
    from engine.serve.cluster.contract import EngineCall
    from engine.serve.cluster.ingress import ATTEMPTS, FimIngress
    from engine.serve.fim_wire import ApiError

    handle = LostReplicaHandle(getattr(grpc.StatusCode, code_name))
    ingress = object.__new__(FimIngress)  # no Serve replica context needed for dispatch
    ingress.engine, ingress.retries = handle, 0
    call = EngineCall(request=CompletionRequest(prefix="def f(", suffix=")"), client=-1)
    with pytest.raises(ApiError) as caught:
        asyncio.run(ingress.dispatch(call, "session-key", None))
    assert handle.calls == ATTEMPTS == 2 and ingress.retries == 1
    assert caught.value.status == 503 and "died (2 tries)" in caught.value.message


def test_a_grpc_refusal_of_the_call_itself_is_not_sent_again():
    """A call too big for gRPC (RESOURCE_EXHAUSTED) would fail on any replica: one try, and
    the 503 names the code instead of saying the replicas died."""
    import grpc

    from engine.api import CompletionRequest
    from engine.serve.cluster.contract import EngineCall
    from engine.serve.cluster.ingress import FimIngress
    from engine.serve.fim_wire import ApiError

    handle = LostReplicaHandle(grpc.StatusCode.RESOURCE_EXHAUSTED)
    ingress = object.__new__(FimIngress)
    ingress.engine, ingress.retries = handle, 0
    call = EngineCall(request=CompletionRequest(prefix="def f(", suffix=")"), client=-1)
    with pytest.raises(ApiError) as caught:
        asyncio.run(ingress.dispatch(call, "session-key", None))
    assert handle.calls == 1 and ingress.retries == 0
    assert caught.value.status == 503 and "RESOURCE_EXHAUSTED" in caught.value.message

"""`FimEngine`: one Serve replica holding the model(s), as the shared engine does on one
machine (engine/serve/host.py: fair turns between sessions, batched passes for the
requests in flight, the exact-request cache, cancel between steps).

With one checkpoint the replica loads it in its constructor, so it is RUNNING only once it
can answer. With several, each is loaded on first use through Serve's model multiplexing
(`@serve.multiplexed`, least recently used unloaded first) and the router prefers replicas
that already hold the requested one.

Serve calls `check_health` (a dead model thread makes the replica be replaced),
`record_routing_stats` (what the ingress's /metrics shows per replica) and `__del__` (after
draining, on scale-down and rolling updates).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from ray import serve

from engine.api import CompletionResult, EngineError
from engine.serve.cluster.contract import EngineAnswer, EngineCall, StreamPart
from engine.serve.draft_queue import DraftQueue
from engine.serve.host import Job, ServiceHost
from engine.serve.peer_api import fit_window, model_name
from engine.serve.server import load_for_service
from engine.serve.stats import ServiceStats

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 1800.0  # a 7B checkpoint from a slow disk


class ModelSlot:
    """One checkpoint in this replica: the shared engine's scheduler around it."""

    def __init__(self, name: str, spec: str, *, device: str, quant: str, cache_size: int,
                 max_in_flight: int):
        self.name, self.spec = name, spec
        self.warm = 0  # answered requests whose context K/V came from an earlier request
        self.answer_name = "maskfill"  # what answers call the model, once it is loaded
        self.scheduler = ServiceHost(lambda: load_for_service(spec, device, quant),
                                       stats=ServiceStats(), cache_size=cache_size,
                                       max_in_flight=max_in_flight)

    def wait_loaded(self) -> None:
        self.scheduler.wait_loaded(LOAD_TIMEOUT_S)
        if self.scheduler.state != "ready":
            raise EngineError(f"model {self.name!r} ({self.spec}) did not load: "
                              f"{self.scheduler.error or self.scheduler.state}")
        # Named once: peer_api.model_name resolves the checkpoint's path on disk, which cost
        # 0.06 ms CPU of every answer when asked per request.
        self.answer_name = model_name(self.scheduler.info)

    def stats(self) -> dict[str, Any]:
        s = self.scheduler
        stats = s.stats
        return {
            "state": s.state,
            "queue_depth": s.queue_depth(),
            "outcomes": dict(stats.outcomes),
            "buckets": stats.cumulative_buckets(),
            "latency_sum_s": stats.latency_sum_s,
            "forward_passes": stats.forward_passes,
            "model_tokens": stats.model_tokens,
            "cache_hits": stats.cache_hits,
            "cache_misses": stats.cache_misses,
            "warm": self.warm,
            "weight_bytes": s.info.weight_bytes if s.info else 0,
        }

    def close(self) -> None:
        self.scheduler.close()

    def __del__(self) -> None:  # Serve's multiplexer unloads a model by dropping it
        self.close()


class FimEngine:
    def __init__(self, models: dict[str, str], *, device: str = "cpu", quant: str = "none",
                 cache_size: int = 256, max_in_flight: int = 8, max_models: int = 2):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.models = dict(models)
        self.default = next(iter(self.models))
        self._slot_options = dict(device=device, quant=quant, cache_size=cache_size,
                                  max_in_flight=max_in_flight)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._jobs = itertools.count(1)
        self.slots: dict[str, ModelSlot] = {}
        self._lock = threading.Lock()
        if len(self.models) == 1:
            self._new_slot(self.default)  # RUNNING means ready to answer
        else:
            async def load(name: str) -> _Unloading:  # a plain function: Serve keeps its
                return await self._load_slot(name)  # model cache on the function object

            self._load = serve.multiplexed(max_num_models_per_replica=max_models)(load)

    def _new_slot(self, name: str) -> ModelSlot:
        slot = ModelSlot(name, self.models[name], **self._slot_options)
        slot.wait_loaded()
        with self._lock:
            self.slots[name] = slot
        return slot

    async def _load_slot(self, name: str) -> _Unloading:
        return _Unloading(await asyncio.to_thread(self._new_slot, name), self)

    async def _slot(self) -> ModelSlot:
        if len(self.models) == 1:
            return self.slots[self.default]
        name = serve.get_multiplexed_model_id() or self.default
        if name not in self.models:
            raise EngineError(f"model {name!r} is not served here")
        return (await self._load(name)).slot

    async def complete(self, payload: bytes) -> bytes:
        """One FIM request (msgpack EngineCall) -> msgpack EngineAnswer."""
        answer = await self.answer(msgspec.msgpack.decode(payload, type=EngineCall))
        return msgspec.msgpack.encode(answer)

    async def answer(self, call: EngineCall) -> EngineAnswer:
        started = time.perf_counter()
        slot = await self._slot()
        result, error = await self._run(slot, call)
        if result is not None and result.stats.reused_context_tokens > 0:
            slot.warm += 1
        return EngineAnswer(result=result, error=error, model=slot.answer_name,
                            replica=self.replica,
                            engine_ms=(time.perf_counter() - started) * 1000.0)

    async def complete_stream(self, payload: bytes) -> AsyncIterator[bytes]:
        """A streamed FIM request (msgpack EngineCall) -> msgpack StreamParts: a draft at each
        host read of the denoising loop as it comes, then the answer (Serve streams a
        generator through `handle.options(stream=True)`)."""
        call = msgspec.msgpack.decode(payload, type=EngineCall)
        started = time.perf_counter()
        slot = await self._slot()
        drafts = DraftQueue()
        who = {"model": slot.answer_name, "replica": self.replica}
        run = asyncio.ensure_future(self._run(slot, call, drafts.put))
        try:
            async for draft in drafts.until(run):
                yield msgspec.msgpack.encode(StreamPart(draft=draft, **who))
            result, error = run.result()
        finally:
            if not run.done():  # the caller hung up: stop the model between steps
                run.cancel()
        if result is not None and result.stats.reused_context_tokens > 0:
            slot.warm += 1
        answer = EngineAnswer(result=result, error=error, engine_ms=(time.perf_counter() - started)
                              * 1000.0, **who)
        yield msgspec.msgpack.encode(StreamPart(answer=answer, **who))

    async def _run(self, slot: ModelSlot, call: EngineCall, on_draft=None
                   ) -> tuple[CompletionResult | None, str | None]:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future = loop.create_future()

        def reply(result, error) -> None:  # from the scheduler's threads
            def settle() -> None:
                if not answer.done():
                    answer.set_result((result, error))
            loop.call_soon_threadsafe(settle)

        request = call.request
        if call.fit_window and slot.scheduler.info is not None:
            request = fit_window(request, slot.scheduler.info.max_context)
        job = Job(client=call.client, id=next(self._jobs), request=request, reply=reply,
                  on_draft=on_draft)
        slot.scheduler.submit(job)
        try:
            return await answer
        except asyncio.CancelledError:  # the caller hung up: stop the model between steps
            slot.scheduler.cancel(call.client, job.id)
            raise

    async def model_info(self) -> tuple[str, int]:
        """(name answers give the model, its context window) of the checkpoint this call is
        for (the multiplexed one; loaded if it is not yet), for the front's GET /v1/models."""
        info = (await self._slot()).scheduler.info
        if info is None:
            raise EngineError("the model is not loaded")
        return model_name(info), info.max_context

    async def health(self) -> dict[str, Any]:
        """What /health reports for this replica."""
        states = {name: slot.scheduler.state for name, slot in self.slots.items()}
        return {"replica": self.replica, "pid": os.getpid(), "models": states}

    def check_health(self) -> None:
        with self._lock:
            slots = list(self.slots.values())
        for slot in slots:
            if slot.scheduler.state not in ("loading", "ready"):
                raise EngineError(f"model {slot.name!r} is {slot.scheduler.state}: "
                                  f"{slot.scheduler.error or 'its model thread stopped'}")

    def record_routing_stats(self) -> dict[str, Any]:
        with self._lock:
            slots = dict(self.slots)
        return {"pid": os.getpid(), "models": {n: s.stats() for n, s in slots.items()}}

    def __del__(self) -> None:
        with self._lock:
            slots, self.slots = list(self.slots.values()), {}
        for slot in slots:
            slot.close()


class _Unloading:
    """What the multiplexer caches: dropping it (LRU) closes the model and forgets its slot."""

    def __init__(self, slot: ModelSlot, owner: FimEngine):
        self.slot, self._owner = slot, owner

    def __del__(self) -> None:
        with self._owner._lock:
            if self._owner.slots.get(self.slot.name) is self.slot:
                del self._owner.slots[self.slot.name]
        self.slot.close()

"""Batches built ahead of the training step in a background thread, so the GPU never waits.

`make(step)` must be a pure function of the step (the trainer seeds its RNG with (seed, step)),
so a prefetched run sees exactly the batches a synchronous one would, and a resumed run too.
The row sampler is numpy (it releases the GIL in its array work), and a queue of a few batches
absorbs its jitter. Time the trainer spends waiting here is counted: it is the GPU's idle time
for lack of data.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any


class Prefetcher:
    def __init__(self, make: Callable[[int], Any], first_step: int, depth: int = 6):
        self._make = make
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.wait_s = 0.0  # time get() spent blocked
        self._thread = threading.Thread(target=self._run, args=(first_step,), daemon=True,
                                        name="batch-prefetch")
        self._thread.start()

    def _run(self, step: int) -> None:
        try:
            while not self._stop.is_set():
                item = (step, self._make(step))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                step += 1
        except BaseException as exc:  # re-raised in the training thread by get()
            self._queue.put((None, exc))

    def get(self, step: int) -> Any:
        """The batch of `step`; steps must be asked for in order."""
        started = time.perf_counter()
        got, item = self._queue.get()
        self.wait_s += time.perf_counter() - started
        if got is None:
            raise RuntimeError(f"building the batch of step {step} failed: {item!r}") from item
        if got != step:
            raise RuntimeError(f"prefetched step {got}, expected {step}")
        return item

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

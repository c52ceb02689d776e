"""Counters of the engine service, kept without any metrics library (the socket server needs
none); metrics.py only formats them for Prometheus."""

from __future__ import annotations

import bisect
import threading
from collections import deque
from typing import Any

# Seconds; an interactive completion is judged in tens to hundreds of milliseconds.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
# cached: answered from the exact-request cache, no model run (still a request served).
# rejected: the client's mistake (a malformed request, a hole beyond the window), refused with
# a 400-style message; error is left for the engine's own failures.
OUTCOMES = ("ok", "cached", "cancelled", "dropped", "timed_out", "rejected", "error")


class ServiceStats:
    """Thread-safe: the model thread records runs, the event loop reads for status/metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.bucket_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)  # last: +Inf
        self.latency_sum_s = 0.0
        self.latency_count = 0
        self.forward_passes = 0
        self.model_tokens = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.model_loads = 0
        self.prewarms = 0  # pre-warms handed to the engine (its idle queue encodes them)
        self.recent_ms: deque[float] = deque(maxlen=1024)

    def record_run(self, outcome: str, seconds: float, forward_passes: int, tokens: int) -> None:
        with self._lock:
            self.outcomes[outcome] += 1
            if outcome in ("ok", "timed_out"):
                self.bucket_counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
                self.latency_sum_s += seconds
                self.latency_count += 1
                self.forward_passes += forward_passes
                self.model_tokens += tokens
                self.recent_ms.append(seconds * 1000.0)

    def record_outcome(self, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] += 1

    def record_prewarm(self) -> None:
        with self._lock:
            self.prewarms += 1

    def record_cache(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.cache_hits += 1
            else:
                self.cache_misses += 1

    def forward_passes_per_token(self) -> float | None:
        with self._lock:
            return self.forward_passes / self.model_tokens if self.model_tokens else None

    def cumulative_buckets(self) -> list[tuple[float, int]]:
        """(upper bound, count of observations <= it), Prometheus style, +Inf last."""
        with self._lock:
            counts = list(self.bucket_counts)
        total, out = 0, []
        for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), counts, strict=True):
            total += count
            out.append((bound, total))
        return out

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            latencies = sorted(self.recent_ms)
            outcomes = dict(self.outcomes)
            hits, misses, loads = self.cache_hits, self.cache_misses, self.model_loads
            prewarms = self.prewarms
        p50 = latencies[len(latencies) // 2] if latencies else None
        p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else None
        fpt = self.forward_passes_per_token()
        return {
            "requests": outcomes,
            "latencyMsP50": round(p50, 2) if p50 is not None else None,
            "latencyMsP95": round(p95, 2) if p95 is not None else None,
            "forwardPassesPerToken": round(fpt, 3) if fpt is not None else None,
            "cacheHits": hits,
            "cacheMisses": misses,
            "modelLoads": loads,
            "prewarms": prewarms,
        }

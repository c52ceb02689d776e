"""Prometheus text for the cluster's /metrics, from the stats each engine replica publishes
(FimEngine.record_routing_stats, refreshed by Serve every few seconds).

The cluster-wide sums keep the single engine's names (engine/serve/metrics.py), so a
dashboard made for one engine reads a cluster unchanged; per-replica series are
`maskfill_replica_*` with `replica` and `model` labels (different names, so `sum()` never
counts a replica twice). `maskfill_cluster_*` are the ingress's own counters.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from engine.serve.stats import LATENCY_BUCKETS_S, OUTCOMES

SCALARS = (  # stats key, metric suffix, help, counter?
    ("forward_passes", "forward_passes", "Model forward passes of finished jobs.", True),
    ("model_tokens", "model_tokens", "Tokens the model committed in finished jobs.", True),
    ("cache_hits", "cache_hits", "Requests answered from the exact-request cache.", True),
    ("cache_misses", "cache_misses", "Cacheable requests the model had to run.", True),
    ("warm", "warm_requests", "Requests whose context K/V came from an earlier request.", True),
    ("queue_depth", "queue_depth", "Jobs queued or running.", False),
)


def model_rows(replicas: dict[str, dict[str, Any]]) -> Iterator[tuple[str, str, dict]]:
    """(replica, model, stats) for every model every replica holds."""
    for replica, stats in sorted(replicas.items()):
        for model, row in sorted((stats.get("models") or {}).items()):
            yield replica, model, row


class ClusterCollector:
    def __init__(self, replicas: dict[str, dict[str, Any]], ingress: dict[str, Any]):
        self.replicas, self.ingress = replicas, ingress

    def collect(self) -> Iterable:
        rows = list(model_rows(self.replicas))
        yield self._latency(rows)
        total = CounterMetricFamily("maskfill_requests", "Completion jobs by outcome.",
                                    labels=["outcome"])
        per = CounterMetricFamily("maskfill_replica_requests", "Completion jobs by outcome, "
                                  "per replica and model.", labels=["replica", "model", "outcome"])
        for outcome in OUTCOMES:
            total.add_metric([outcome], sum(r.get("outcomes", {}).get(outcome, 0)
                                            for _, _, r in rows))
            for replica, model, row in rows:
                per.add_metric([replica, model, outcome],
                               row.get("outcomes", {}).get(outcome, 0))
        yield total
        yield per
        for key, suffix, text, counter in SCALARS:
            kind = CounterMetricFamily if counter else GaugeMetricFamily
            yield kind(f"maskfill_{suffix}", text, value=sum(r.get(key, 0) for _, _, r in rows))
            family = kind(f"maskfill_replica_{suffix}", text, labels=["replica", "model"])
            for replica, model, row in rows:
                family.add_metric([replica, model], row.get(key, 0))
            yield family
        resident = GaugeMetricFamily("maskfill_resident_bytes", "Memory the models hold.",
                                     labels=["kind"])
        resident.add_metric(["weights"], sum(r.get("weight_bytes", 0) for _, _, r in rows))
        yield resident
        ready = [r for _, _, r in rows if r.get("state") == "ready"]
        yield GaugeMetricFamily("maskfill_model_loaded", "1 once a replica can answer.",
                                value=1.0 if ready else 0.0)
        yield GaugeMetricFamily("maskfill_cluster_replicas", "Engine replicas known to the "
                                "ingress's router.", value=len(self.replicas))
        yield CounterMetricFamily("maskfill_cluster_retries", "Requests sent again because "
                                  "their replica died.", value=self.ingress.get("retries", 0))
        routed = CounterMetricFamily("maskfill_cluster_routed", "Routing decisions by reason "
                                     "(home, remembered, spill, two-choice).", labels=["reason"])
        for reason, count in sorted(self.ingress.get("routed", {}).items()):
            routed.add_metric([reason], count)
        yield routed

    @staticmethod
    def _latency(rows: list[tuple[str, str, dict]]) -> HistogramMetricFamily:
        bounds = [*LATENCY_BUCKETS_S, float("inf")]
        counts = [0] * len(bounds)
        for _, _, row in rows:
            for i, (_, count) in enumerate(row.get("buckets") or []):
                counts[i] += count
        return HistogramMetricFamily(
            "maskfill_request_latency_seconds",
            "Model time per finished completion (queue wait excluded), all replicas.",
            buckets=[("+Inf" if b == float("inf") else repr(b), c)
                     for b, c in zip(bounds, counts, strict=True)],
            sum_value=sum(r.get("latency_sum_s", 0.0) for _, _, r in rows))


def render(replicas: dict[str, dict[str, Any]], ingress: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(replicas, ingress))  # type: ignore[arg-type]
    return generate_latest(registry)

"""Prometheus text for /metrics, rendered by prometheus_client from the service's own counters
(stats.py), so the socket server never needs the library."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

if TYPE_CHECKING:
    from engine.serve.server import EngineService

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceCollector:
    """Reads the service at scrape time: nothing is double-counted or kept twice."""

    def __init__(self, service: EngineService):
        self.service = service

    def collect(self):
        service = self.service
        stats = service.scheduler.stats
        buckets = stats.cumulative_buckets()
        latency = HistogramMetricFamily(
            "maskfill_request_latency_seconds",
            "Model time per finished completion (queue wait excluded).",
            buckets=[("+Inf" if b == float("inf") else repr(b), c) for b, c in buckets],
            sum_value=stats.latency_sum_s,
        )
        yield latency
        requests = CounterMetricFamily(
            "maskfill_requests", "Completion jobs by outcome.", labels=["outcome"])
        for outcome, count in stats.snapshot()["requests"].items():
            requests.add_metric([outcome], count)
        yield requests
        yield CounterMetricFamily(
            "maskfill_forward_passes", "Model forward passes of finished jobs.",
            value=stats.forward_passes)
        yield CounterMetricFamily(
            "maskfill_model_tokens", "Tokens the model committed in finished jobs.",
            value=stats.model_tokens)
        per_token = stats.forward_passes_per_token()
        yield GaugeMetricFamily(
            "maskfill_forward_passes_per_token",
            "Forward passes per committed token so far (NaN before the first job).",
            value=per_token if per_token is not None else float("nan"))
        yield GaugeMetricFamily(
            "maskfill_queue_depth", "Jobs queued or running.",
            value=service.scheduler.queue_depth())
        yield CounterMetricFamily(
            "maskfill_cache_hits", "Requests answered from the exact-request cache.",
            value=stats.cache_hits)
        yield CounterMetricFamily(
            "maskfill_cache_misses", "Cacheable requests the model had to run.",
            value=stats.cache_misses)
        resident = GaugeMetricFamily(
            "maskfill_resident_bytes", "Memory the model holds.", labels=["kind"])
        for kind, value in service.resident_bytes().items():
            resident.add_metric([kind], value)
        yield resident
        yield GaugeMetricFamily(
            "maskfill_clients", "Connected socket clients.", value=len(service.clients))
        yield GaugeMetricFamily(
            "maskfill_model_loaded", "1 once the model is ready.",
            value=1.0 if service.scheduler.state == "ready" else 0.0)


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def registry_for(service: EngineService) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(service))  # type: ignore[arg-type]
    return registry

"""Prometheus metrics (prefix ``encore:``, names modelled on vLLM's), on a per-app registry.

Request-level metrics (latencies, token counts, outcomes) are recorded here in P0. Engine
metrics are defined once in ``encore.protocol.metrics.ENGINE_METRICS`` and read from
``EngineClient.stats()`` (the totals accumulated since start) at scrape time by
:class:`EngineStatsCollector`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from encore.protocol.metrics import ENGINE_METRICS, EngineMetric, EngineTotals

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


class EngineStatsCollector(Collector):
    """Exposes every engine metric of ``ENGINE_METRICS`` from the totals at scrape time."""

    def __init__(self, totals: Callable[[], EngineTotals | None]) -> None:
        self._totals = totals

    def collect(self) -> Iterator[Metric]:
        totals = self._totals() or EngineTotals()
        for metric in ENGINE_METRICS:
            yield _family(metric, totals)


def _family(m: EngineMetric, totals: EngineTotals) -> Metric:
    if m.kind == "histogram":
        hist = totals.histograms[m.key]
        return HistogramMetricFamily(m.name, m.doc, buckets=_buckets(hist.bounds, hist.counts),
                                     sum_value=hist.sum)
    family = GaugeMetricFamily if m.kind == "gauge" else CounterMetricFamily
    if not m.labels:
        return family(m.name, m.doc, value=totals.value(m.key))
    out = family(m.name, m.doc, labels=list(m.labels))
    for label, value in sorted(totals.labeled.get(m.key, {}).items()):
        out.add_metric(label.split(">", len(m.labels) - 1), value)
    return out


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, int]]:
    """Prometheus (le, cumulative count) pairs from per-bucket counts (+Inf last)."""
    cumulative, out = 0, []
    for bound, count in zip((*map(str, bounds), "+Inf"), counts, strict=True):
        cumulative += count
        out.append((bound, cumulative))
    return out


class ServerMetrics:
    """All of P0's metrics on one registry (one per app, so tests can build many apps)."""

    def __init__(self, stats: Callable[[], EngineTotals | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(EngineStatsCollector(stats))
        self.prompt_tokens = Counter("encore:prompt_tokens", "Prompt tokens received",
                                     registry=r)
        self.generation_tokens = Counter("encore:generation_tokens", "Tokens generated",
                                         registry=r)
        self.request_success = Counter("encore:request_success", "Finished requests by "
                                       "finish reason", ["finished_reason"], registry=r)
        self.request_errors = Counter("encore:request_errors", "Requests rejected or failed, "
                                      "by HTTP status", ["status"], registry=r)
        self.ttft = Histogram("encore:time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("encore:inter_token_latency_seconds", "Time between output "
                             "tokens", buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("encore:e2e_request_latency_seconds", "End-to-end request "
                             "latency", buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("encore:request_queue_time_seconds", "Time from arrival "
                                    "to submission to the engine (tokenization, admission)",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram("encore:request_prompt_tokens", "Prompt tokens "
                                               "per request", buckets=_TOKEN_BUCKETS,
                                               registry=r)
        self.request_generation_tokens = Histogram("encore:request_generation_tokens",
                                                   "Generated tokens per request",
                                                   buckets=_TOKEN_BUCKETS, registry=r)
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(finished_reason=reason)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

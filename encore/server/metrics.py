"""Prometheus metrics (prefix ``encore:``, names modelled on vLLM's), on a per-app registry.

Request-level metrics (latencies, token counts, outcomes) are recorded here in P0. Engine
gauges and counters (running/waiting, KV usage, prefix cache, preemptions) are read from
``EngineClient.stats()`` at scrape time by :class:`EngineStatsCollector`; ``stats()`` carries
current gauges and counters accumulated since the engine started.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from encore.protocol.messages import JOB_BUCKETS, KV_LOAD_BUCKETS, PIN_TTL_BUCKETS, EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


class EngineStatsCollector(Collector):
    """Exposes the engine's gauges and cumulative counters at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats | None],
                 kv_load_histogram: Callable[[], Any] | None = None) -> None:
        self._stats = stats
        self._kv_load = kv_load_histogram

    def collect(self) -> Iterator[Metric]:
        s = self._stats() or EngineStats()
        yield from self._tier_metrics(s)
        yield _gauge("encore:num_requests_running", "Requests in the running batch",
                     s.num_running)
        yield _gauge("encore:num_requests_waiting", "Requests waiting to be scheduled",
                     s.num_waiting)
        yield _gauge("encore:kv_cache_usage_perc", "Fraction of device KV blocks in use (0-1)",
                     s.kv_cache_usage)
        yield _counter("encore:prefix_cache_queries", "Prompt tokens looked up in the prefix "
                       "cache", s.prefix_queries)
        yield _counter("encore:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                       s.prefix_hits)
        yield _counter("encore:num_preemptions", "Sequences preempted by the scheduler",
                       s.preemptions)
        yield from _pin_metrics(s)
        yield from _chunk_metrics(s)


    def _tier_metrics(self, s: EngineStats) -> Iterator[Metric]:
        usage = GaugeMetricFamily("encore:kv_tier_usage_bytes", "Bytes of KV cache held per "
                                  "tier (device, host, disk)", labels=["tier"])
        for tier, value in sorted(s.kv_tier_usage_bytes.items()):
            usage.add_metric([tier], value)
        yield usage
        hits = CounterMetricFamily("encore:kv_tier_hit_tokens", "Prompt tokens reused, by the "
                                   "tier they came from", labels=["tier"])
        for tier, value in sorted(s.kv_tier_hit_tokens.items()):
            hits.add_metric([tier], value)
        yield hits
        moved = CounterMetricFamily("encore:kv_tier_transfer_bytes", "KV bytes copied between "
                                    "tiers", labels=["src", "dst"])
        for route, value in sorted(s.kv_tier_transfer_bytes.items()):
            moved.add_metric(route.split(">", 1), value)
        yield moved
        yield _counter("encore:kv_disk_corrupt_files", "Bad disk KV files found (and "
                       "deleted): short, corrupt or of another model", s.kv_disk_corrupt_files)
        hist = self._kv_load() if self._kv_load is not None else None
        if hist is not None:
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, KV_LOAD_BUCKETS), "+Inf"), hist.counts,
                                    strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            yield HistogramMetricFamily("encore:kv_tier_load_seconds", "Time a request waited "
                                        "for its KV to load from the host or disk tier",
                                        buckets=buckets, sum_value=hist.sum)


def _pin_metrics(s: EngineStats) -> Iterator[Metric]:
    """TTL pins of agent programs (Continuum)."""
    yield _gauge("encore:pinned_blocks", "Device KV blocks held by TTL pins", s.pinned_blocks)
    yield _counter("encore:pin_hits", "Pins claimed by their program's next turn", s.pin_hits)
    yield _counter("encore:pin_expired", "Pins whose TTL ran out", s.pin_expired)
    yield HistogramMetricFamily("encore:pin_ttl_seconds", "TTLs chosen for new KV pins",
                                buckets=_buckets(PIN_TTL_BUCKETS, s.pin_ttl_bucket_counts),
                                sum_value=s.pin_ttl_sum)
    yield HistogramMetricFamily("encore:job_completion_seconds", "Agent programs: first "
                                "request to the end of the is_last_step turn",
                                buckets=_buckets(JOB_BUCKETS, s.job_completion_bucket_counts),
                                sum_value=s.job_completion_sum)


def _chunk_metrics(s: EngineStats) -> Iterator[Metric]:
    """Position-independent chunk reuse (CacheBlend)."""
    yield _counter("encore:chunk_queries", "Chunks looked up in the chunk store",
                   s.chunk_queries)
    yield _counter("encore:chunk_hit_tokens", "Tokens of chunks found cached (blended)",
                   s.chunk_hit_tokens)
    yield _counter("encore:chunk_recomputed_tokens", "Tokens of cached chunks recomputed while "
                   "blending", s.chunk_recomputed_tokens)


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, int]]:
    """Prometheus (le, cumulative count) pairs from per-bucket counts (+Inf last)."""
    counts = counts or [0] * (len(bounds) + 1)
    cumulative, out = 0, []
    for bound, count in zip((*map(str, bounds), "+Inf"), counts, strict=True):
        cumulative += count
        out.append((bound, cumulative))
    return out


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    """All of P0's metrics on one registry (one per app, so tests can build many apps)."""

    def __init__(self, stats: Callable[[], EngineStats | None],
                 kv_load_histogram: Callable[[], Any] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(EngineStatsCollector(stats, kv_load_histogram))
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

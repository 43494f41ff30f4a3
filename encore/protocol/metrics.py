"""The engine's metrics, defined once: name, kind, help, labels, buckets (``ENGINE_METRICS``).

    P1  Scheduler.snapshot() ── cumulative values ──► Increments ──EngineStats──► P0
    P0  EngineTotals.add(EngineStats)  (gauges replaced, counters summed, histograms bucketed)
        server/metrics.py exports every entry of ENGINE_METRICS from the totals at scrape time

Adding an engine metric is one entry here plus the code in P1 that counts it (a key of the
scheduler's snapshot): the wire message, P0's accumulation and the Prometheus exposition
follow from the entry. Counters travel as increments, so a restarted engine (P1 counts from 0
again) never makes P0's totals go down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from encore.protocol.messages import EngineStats

Kind = Literal["gauge", "counter", "histogram"]

# Upper bounds (seconds) of the histograms' buckets.
KV_LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)
PIN_TTL_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
JOB_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)


@dataclass(frozen=True)
class EngineMetric:
    """One engine metric. ``key``: its key in the scheduler's snapshot and in ``EngineStats``;
    ``name``: the Prometheus name (a counter's gets ``_total``). A labelled metric's values
    are keyed by label values joined with ``>`` (``"device>host"`` for ``src``, ``dst``)."""

    key: str
    name: str
    kind: Kind
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


ENGINE_METRICS: tuple[EngineMetric, ...] = (
    EngineMetric("num_running", "encore:num_requests_running", "gauge",
                 "Requests in the running batch"),
    EngineMetric("num_waiting", "encore:num_requests_waiting", "gauge",
                 "Requests waiting to be scheduled (or for their KV to load)"),
    EngineMetric("kv_cache_usage", "encore:kv_cache_usage_perc", "gauge",
                 "Fraction of device KV blocks in use (0-1)"),
    EngineMetric("worker_up", "encore:worker_up", "gauge",
                 "1 while the model worker (every tensor-parallel rank) runs, 0 while it "
                 "restarts after a death (/health answers 503 meanwhile)"),
    EngineMetric("prefix_queries", "encore:prefix_cache_queries", "counter",
                 "Prompt tokens looked up in the prefix cache"),
    EngineMetric("prefix_hits", "encore:prefix_cache_hits", "counter",
                 "Prompt tokens found in the prefix cache"),
    EngineMetric("preemptions", "encore:num_preemptions", "counter",
                 "Sequences preempted by the scheduler"),
    EngineMetric("prompt_tokens", "encore:prompt_tokens_computed", "counter",
                 "Prompt tokens the engine computed (reused ones excluded)"),
    EngineMetric("generation_tokens", "encore:generation_tokens_sampled", "counter",
                 "Tokens the engine sampled (those of aborted requests included)"),
    EngineMetric("kv_tier_usage_bytes", "encore:kv_tier_usage_bytes", "gauge",
                 "Bytes of KV cache held per tier (device, host, disk; remote: what this "
                 "replica knows the shared store holds)", ("tier",)),
    EngineMetric("kv_tier_hit_tokens", "encore:kv_tier_hit_tokens", "counter",
                 "Prompt tokens reused, by the tier they came from", ("tier",)),
    EngineMetric("kv_tier_transfer_bytes", "encore:kv_tier_transfer_bytes", "counter",
                 "KV bytes copied between tiers", ("src", "dst")),
    EngineMetric("kv_disk_corrupt_files", "encore:kv_disk_corrupt_files", "counter",
                 "Bad disk KV files found (and deleted): short, corrupt or of another model"),
    EngineMetric("kv_tier_load_seconds", "encore:kv_tier_load_seconds", "histogram",
                 "Time a request waited for its KV to load from a lower tier (host, disk, "
                 "remote)", buckets=KV_LOAD_BUCKETS),
    EngineMetric("kv_tier_transfer_seconds", "encore:kv_tier_transfer_seconds", "histogram",
                 "Measured transfer time of a request's KV loaded from a lower tier: the "
                 "worker's timed copies of its blocks (with their decode), not the wait "
                 "around them", buckets=KV_LOAD_BUCKETS),
    EngineMetric("kv_remote_errors", "encore:kv_remote_errors", "counter",
                 "Remote tier operations that failed, by kind (down, timeout, full, miss, "
                 "corrupt, too_big, other); each is a miss, never a request error", ("kind",)),
    EngineMetric("kv_tier_bandwidth", "encore:kv_tier_bandwidth_bytes_per_second", "gauge",
                 "The load policy's estimate of each lower tier's throughput, from its timed "
                 "transfers (a prior until the first): with encore:kv_prefill_tokens_per_second "
                 "it decides whether a tier hit is loaded or recomputed", ("tier",)),
    EngineMetric("kv_prefill_rate", "encore:kv_prefill_tokens_per_second", "gauge",
                 "The load policy's estimate of prefill speed, from prefill-heavy steps (a "
                 "prior until the first)"),
    EngineMetric("kv_remote_up", "encore:kv_remote_up", "gauge",
                 "1 while the remote tier's store answers, 0 while down (or not configured)"),
    EngineMetric("pinned_blocks", "encore:pinned_blocks", "gauge",
                 "Device KV blocks held by TTL pins"),
    EngineMetric("pin_hits", "encore:pin_hits", "counter",
                 "Pins claimed by their program's next turn"),
    EngineMetric("pin_expired", "encore:pin_expired", "counter", "Pins whose TTL ran out"),
    EngineMetric("pin_ttl_seconds", "encore:pin_ttl_seconds", "histogram",
                 "TTLs chosen for new KV pins", buckets=PIN_TTL_BUCKETS),
    EngineMetric("job_completion_seconds", "encore:job_completion_seconds", "histogram",
                 "Agent programs: first request to the end of the is_last_step turn",
                 buckets=JOB_BUCKETS),
    EngineMetric("chunk_queries", "encore:chunk_queries", "counter",
                 "Chunks looked up in the chunk store"),
    EngineMetric("chunk_hit_tokens", "encore:chunk_hit_tokens", "counter",
                 "Tokens of chunks found cached (blended)"),
    EngineMetric("chunk_recomputed_tokens", "encore:chunk_recomputed_tokens", "counter",
                 "Tokens of cached chunks recomputed while blending"),
)
BY_KEY = {m.key: m for m in ENGINE_METRICS}

Snapshot = Mapping[str, float | Mapping[str, float] | list[float]]


class Increments:
    """P1: turns cumulative snapshots into ``EngineStats`` (counters as increments since the
    previous message, gauges as they are, histogram observations passed through)."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def message(self, snapshot: Snapshot) -> EngineStats:
        values: dict[str, float] = {}
        labeled: dict[str, dict[str, float]] = {}
        observed: dict[str, list[float]] = {}
        for key, value in snapshot.items():
            metric = BY_KEY[key]  # an unknown key is a bug: KeyError
            if isinstance(value, list):
                observed[key] = value
            elif isinstance(value, Mapping):
                labeled[key] = {k: self._value(metric, f"{key}/{k}", v) for k, v in value.items()}
            else:
                values[key] = self._value(metric, key, value)
        return EngineStats(values=values, labeled=labeled, observed=observed)

    def _value(self, metric: EngineMetric, slot: str, value: float) -> float:
        if metric.kind != "counter":
            return value
        delta = value - self._last.get(slot, 0)
        self._last[slot] = value
        return delta


class Histogram:
    """Cumulative bucket counts over ``bounds`` (+Inf last) and the sum of observations."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, values: list[float]) -> None:
        for v in values:
            i = next((i for i, b in enumerate(self.bounds) if v <= b), len(self.bounds))
            self.counts[i] += 1
            self.sum += v


class EngineTotals:
    """P0: the engine's metrics accumulated from every ``EngineStats`` since start."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.labeled: dict[str, dict[str, float]] = {}
        self.histograms = {m.key: Histogram(m.buckets) for m in ENGINE_METRICS
                           if m.kind == "histogram"}

    def add(self, stats: EngineStats) -> None:
        for key, value in stats.values.items():
            self.values[key] = _combine(BY_KEY[key], self.values.get(key, 0.0), value)
        for key, by_label in stats.labeled.items():
            metric, mine = BY_KEY[key], self.labeled.setdefault(key, {})
            for label, value in by_label.items():
                mine[label] = _combine(metric, mine.get(label, 0.0), value)
        for key, observations in stats.observed.items():
            self.histograms[key].observe(observations)

    def value(self, key: str) -> float:
        return self.values.get(key, 0.0)

    def __getitem__(self, key: str) -> Any:
        """A plain metric's total, a labelled one's totals by label, or a ``Histogram``."""
        kind = BY_KEY[key]
        if kind.kind == "histogram":
            return self.histograms[key]
        return self.labeled.get(key, {}) if kind.labels else self.value(key)

    @property
    def num_running(self) -> int:
        return int(self.value("num_running"))

    @property
    def num_waiting(self) -> int:
        return int(self.value("num_waiting"))


def _combine(metric: EngineMetric, total: float, value: float) -> float:
    return total + value if metric.kind == "counter" else value

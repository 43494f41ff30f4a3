"""The interface the API server (and offline users) talk to: ``EngineClient``.

Implementations: ``scheduler.inproc_client.InprocEngineClient`` (engine loop on a thread,
worker in-process or as a child process) and ``scheduler.mp_client.MPEngineClient`` (P1 and P2
as child processes; what the API server uses, so the server never imports the scheduler core).
FastAPI routes depend only on this interface.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from typing import Any

from encore.protocol.messages import (
    JOB_BUCKETS,
    KV_LOAD_BUCKETS,
    PIN_TTL_BUCKETS,
    AbortRequest,
    EngineOutputs,
    EngineReady,
    EngineRequest,
    EngineStats,
    RequestOutput,
    Shutdown,
    ToolCalled,
)


class EngineError(RuntimeError):
    """The engine failed a request (worker died, engine gone); the message is user-safe."""


class EngineClient(abc.ABC):
    """Async handle on a running engine."""

    @abc.abstractmethod
    async def start(self) -> EngineReady:
        """Start the engine (load the model); return its description once ready."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True while the engine can take requests (``/health`` 200)."""

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Submit ``request`` and yield its outputs until every sequence has finished.

        Each yielded ``RequestOutput`` carries the *new* tokens of one sequence (``index``).
        Leaving the iterator early (``aclose``/cancellation) aborts the request.
        Raises ``EngineError`` if the engine fails the request.
        """

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed at once. Unknown ids are ignored."""

    @abc.abstractmethod
    def tool_called(self, program: str, tools: list[str]) -> None:
        """The turn of agent program ``program`` that just ended called ``tools`` (function
        names, parsed by the server): TTL pins learn how long each tool pauses a program."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Latest gauges (and counters accumulated since start) from the engine."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine and its processes."""


_COUNTERS = ("prefix_queries", "prefix_hits", "preemptions", "prompt_tokens", "generation_tokens",
             "kv_disk_corrupt_files", "pin_hits", "pin_expired", "chunk_queries",
             "chunk_hit_tokens", "chunk_recomputed_tokens")
_DICT_COUNTERS = ("kv_tier_hit_tokens", "kv_tier_transfer_bytes")


class LoadHistogram:
    """Cumulative bucket counts of ``kv_tier_load_seconds`` (bounds: ``KV_LOAD_BUCKETS``)."""

    def __init__(self, bounds: tuple[float, ...] = KV_LOAD_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last bucket: +Inf
        self.sum = 0.0

    def observe(self, values: list[float]) -> None:
        for v in values:
            i = next((i for i, b in enumerate(self.bounds) if v <= b), len(self.bounds))
            self.counts[i] += 1
            self.sum += v


class _Router:
    """Routes outputs to per-request queues and keeps cumulative stats."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue] = {}
        self.totals = EngineStats()
        self.kv_load_seconds = LoadHistogram()
        self.pin_ttl_seconds = LoadHistogram(PIN_TTL_BUCKETS)
        self.job_seconds = LoadHistogram(JOB_BUCKETS)

    def dispatch(self, batch: EngineOutputs) -> None:
        for out in batch.outputs:
            q = self.queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
        if batch.stats is not None:
            s, t = batch.stats, self.totals
            self.kv_load_seconds.observe(s.kv_tier_load_seconds)
            self.pin_ttl_seconds.observe(s.pin_ttl_seconds)
            self.job_seconds.observe(s.job_completion_seconds)
            sums: dict[str, Any] = {c: getattr(t, c) + getattr(s, c) for c in _COUNTERS}
            sums.update({c: _add(getattr(t, c), getattr(s, c)) for c in _DICT_COUNTERS})
            self.totals = EngineStats(
                num_running=s.num_running, num_waiting=s.num_waiting,
                kv_cache_usage=s.kv_cache_usage,
                kv_tier_usage_bytes=s.kv_tier_usage_bytes or t.kv_tier_usage_bytes,
                pinned_blocks=s.pinned_blocks,
                pin_ttl_bucket_counts=list(self.pin_ttl_seconds.counts),
                pin_ttl_sum=self.pin_ttl_seconds.sum,
                job_completion_bucket_counts=list(self.job_seconds.counts),
                job_completion_sum=self.job_seconds.sum, **sums)

    def fail_all(self, reason: str) -> None:
        for q in self.queues.values():
            q.put_nowait(EngineError(reason))


def _add(total: dict[str, int], delta: dict[str, int]) -> dict[str, int]:
    out = dict(total)
    for k, v in delta.items():
        out[k] = out.get(k, 0) + v
    return out


class BaseEngineClient(EngineClient):
    """Request routing, readiness and stats shared by the implementations."""

    def __init__(self) -> None:
        self.router = _Router()
        self._ready = False
        self.info: EngineReady | None = None

    @property
    def ready(self) -> bool:
        return self._ready

    def stats(self) -> EngineStats:
        return self.router.totals

    def kv_load_histogram(self) -> LoadHistogram:
        """Cumulative histogram of per-request KV staging times (seconds)."""
        return self.router.kv_load_seconds

    def _send(self, msg: EngineRequest | AbortRequest | ToolCalled | Shutdown) -> None:
        raise NotImplementedError

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        if not self._ready:
            raise EngineError("the engine is not ready")
        if request.request_id in self.router.queues:
            raise EngineError(f"duplicate request id {request.request_id!r}")
        q: asyncio.Queue = asyncio.Queue()
        self.router.queues[request.request_id] = q
        remaining = request.sampling.n
        try:
            self._send(request)
            while remaining:
                item = await q.get()
                if isinstance(item, EngineError):
                    raise item
                if item.finish_reason == "error":
                    raise EngineError(item.error or "the engine failed the request")
                if item.finish_reason is not None:
                    remaining -= 1
                yield item
        finally:
            self.router.queues.pop(request.request_id, None)
            if remaining and self._ready:
                self._send(AbortRequest([request.request_id]))

    async def abort(self, request_id: str) -> None:
        if self._ready:
            self._send(AbortRequest([request_id]))

    def tool_called(self, program: str, tools: list[str]) -> None:
        if self._ready:
            self._send(ToolCalled(program, tools))

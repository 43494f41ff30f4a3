"""Agent programs in the scheduler: TTL pins between turns, gaps, and job completion times.

A program is named by ``prompt_cache_key`` (the server maps Continuum's ``job_id`` onto it).

    P's turn called tools ──tool_called─► (from the server's tool-call parser) P's pin gets
                                        the TTL those tools' past gaps call for
    request of P arrives ──started──► gap since P's last turn ended → TTL policy; P's pin
                                        stops expiring (the turn waits in the queue)
    turn of P admitted   ──claim────► P's pin released (its sequence holds the blocks now)
    turn of P ends       ──turn_ended─► pin its KV (TTL from the policy or the request),
                                        or, on P's ``is_last_step``, drop the pin and record
                                        the job's completion time; and, on every turn, pin
                                        each explicit breakpoint's prefix for its own TTL

Pins belong to the sequence's tenant (its cache salt); with ``max_pinned_gib_per_tenant`` a
tenant's pins hold at most that much device KV (see ``PinTable._fit``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from encore.configs.types import CacheConfig
from encore.kvmanager.manager import KVCacheManager
from encore.kvmanager.pins import PinTable, TTLPolicy
from encore.scheduler.request import Seq, SeqStatus

_MAX_PROGRAMS = 65536  # programs whose first arrival is remembered (oldest forgotten first)


class Programs:
    """The scheduler's per-program bookkeeping; owns the KV manager's pin table, if on."""

    def __init__(self, kv: KVCacheManager, cache: CacheConfig,
                 clock: Callable[[], float], block_bytes: int = 0) -> None:
        """``block_bytes``: device bytes of one KV block (all layers), from the worker; needed
        only for ``max_pinned_gib_per_tenant``."""
        self.kv = kv
        self.clock = clock
        if cache.enable_ttl_pins:
            cap = int(cache.max_pinned_fraction * kv.num_usable_blocks)
            quota = _tenant_quota_blocks(cache, block_bytes)
            policy = TTLPolicy(cache.max_pin_ttl_s, cache.block_size)
            kv.enable_pins(lambda pool: PinTable(pool, policy, cap, clock,
                                                 max_tenant_blocks=quota))
        self._start: OrderedDict[str, float] = OrderedDict()  # first request's arrival
        self._job_seconds: list[float] = []  # completion times, drained by stats()
        self._reported = dict.fromkeys(("hits", "expired"), 0)

    def started(self, program: str) -> None:
        """A request of ``program`` arrived."""
        now = self.clock()
        if self.kv.pins is not None:
            self.kv.pins.policy.turn_started(program, now)
            self.kv.pins.awaited(program)
        if program not in self._start:
            self._start[program] = now
            if len(self._start) > _MAX_PROGRAMS:
                self._start.popitem(last=False)

    def tool_called(self, program: str, tools: list[str]) -> None:
        """The last turn of ``program`` ended in calls of ``tools`` (names)."""
        if self.kv.pins is not None:
            self.kv.pins.tool_called(program, tools)

    def expire(self) -> None:
        """Release expired pins (at the start of a step, so demotions go out with it)."""
        if self.kv.pins is not None:
            self.kv.pins.expire()

    def admitting(self, seq: Seq | None, others_running: bool = False) -> None:
        """While ``seq`` is being admitted, pressure releases its program's pin last (it is
        about to be claimed), and none at all while ``others_running`` (the admission waits
        for room instead: Continuum keeps a paused program's KV over admitting a new one);
        None ends that."""
        if self.kv.pins is not None:
            self.kv.pins.protected = seq.program if seq is not None else None
            self.kv.pins.frozen = seq is not None and others_running

    def claim(self, seq: Seq, hits: list[int]) -> None:
        """``seq`` was admitted holding ``hits``: its program's pin has done its job."""
        if self.kv.pins is not None and seq.program is not None:
            self.kv.pins.claim(seq.program, hits)

    def turn_ended(self, seq: Seq, status: SeqStatus) -> None:
        """Call before ``seq``'s blocks are freed: pin them unless it was the last step, and
        pin its explicit breakpoints' prefixes (also on the last step). A turn that was
        aborted or failed pins nothing."""
        pins, program = self.kv.pins, seq.program
        if program is None or seq.index != 0:
            return
        done = status in (SeqStatus.FINISHED_STOPPED, SeqStatus.FINISHED_LENGTH)
        if pins is not None and not done:
            pins.abandoned(program)  # if it never got in, the pin it awaited expires again
        if seq.is_last_step:
            start = self._start.pop(program, None)
            if start is not None and done:
                self._job_seconds.append(self.clock() - start)
            if pins is not None:
                pins.drop(program)
                pins.policy.forget(program)
        elif pins is not None and done:
            self.kv.pin_prefix(seq, program, seq.pin_ttl_s)
        if pins is not None and done:
            for num_tokens, ttl_s in seq.pin_breakpoints:
                self.kv.pin_prefix(seq, program, ttl_s, num_tokens)

    def stats(self) -> dict[str, Any]:
        """``EngineStats`` fields: pinned blocks now, increments and observations since the
        previous call."""
        jobs, self._job_seconds = self._job_seconds, []
        pins = self.kv.pins
        if pins is None:
            return dict(job_completion_seconds=jobs)
        totals = {"hits": pins.hits, "expired": pins.expired}
        delta = {k: v - self._reported[k] for k, v in totals.items()}
        self._reported = totals
        return dict(pinned_blocks=pins.num_pinned_blocks, pin_hits=delta["hits"],
                    pin_expired=delta["expired"], pin_ttl_seconds=pins.take_ttls(),
                    job_completion_seconds=jobs)


def _tenant_quota_blocks(cache: CacheConfig, block_bytes: int) -> int | None:
    """``max_pinned_gib_per_tenant`` in whole blocks (None = no quota)."""
    if cache.max_pinned_gib_per_tenant <= 0:
        return None
    if block_bytes <= 0:
        raise ValueError("cache.max_pinned_gib_per_tenant needs the KV block size in bytes "
                         "(the engine passes it from the worker)")
    return int(cache.max_pinned_gib_per_tenant * 2**30) // block_bytes

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

from encore.kvmanager.manager import KVCacheManager
from encore.kvmanager.pins import Admission
from encore.scheduler.request import Seq, SeqStatus

_MAX_PROGRAMS = 65536  # programs whose first arrival is remembered (oldest forgotten first)


class Programs:
    """The scheduler's per-program bookkeeping over the KV manager's pin table (if any)."""

    def __init__(self, kv: KVCacheManager, clock: Callable[[], float]) -> None:
        self.kv = kv
        self.clock = clock
        self._start: OrderedDict[str, float] = OrderedDict()  # first request's arrival
        self._job_seconds: list[float] = []  # completion times, drained by snapshot()

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

    @staticmethod
    def admission(seq: Seq, others_running: bool) -> Admission:
        """How pins yield to ``seq``'s admission: its program's last, and while
        ``others_running`` only those cheap to reload (Continuum; see ``Admission``)."""
        return Admission(seq.program, others_running)

    def claim(self, seq: Seq, hits: list[int]) -> None:
        """``seq`` was admitted holding ``hits``: its program's pin has done its job."""
        if self.kv.pins is None:
            return
        self.kv.pins.refresh(hits)
        if seq.program is not None:
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
            soft = [(n, ttl, True) for n, ttl in seq.soft_pin_breakpoints]
            for num_tokens, ttl_s, is_soft in [*((n, t, False) for n, t in seq.pin_breakpoints),
                                               *soft]:
                self.kv.pin_prefix(seq, program, ttl_s, num_tokens, soft=is_soft)
                if self._outlives_checkpoints(ttl_s):  # the promise holds across a crash
                    self.kv.persist_prefix(seq, num_tokens)

    def _outlives_checkpoints(self, ttl_s: float) -> bool:
        tiers = self.kv.tiers
        return tiers is not None and ttl_s > tiers.checkpoint_interval_s

    def snapshot(self) -> dict[str, Any]:
        """Program metrics (``protocol.metrics``): pinned blocks now, pin counters since
        start, TTLs and job completion times observed since the last call."""
        jobs, self._job_seconds = self._job_seconds, []
        pins = self.kv.pins
        if pins is None:
            return dict(pinned_blocks=0, pin_hits=0, pin_expired=0, job_completion_seconds=jobs)
        return dict(pinned_blocks=pins.num_pinned_blocks, pin_hits=pins.hits,
                    pin_expired=pins.expired, pin_ttl_seconds=pins.take_ttls(),
                    job_completion_seconds=jobs)

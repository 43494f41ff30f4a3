"""TTL pins for agent programs (Continuum): keep a program's KV on the device between turns.

    turn k ends ──pin(blocks, ttl)──► pinned (a pool reference; never LRU-evicted)
        │                               │
        │      next turn of the program ┤──claim──► its sequence holds the blocks (pin hit)
        │                    ttl passes ┤──expire──► demoted to the host tier, then LRU-cached
        │      allocation would fail    └──release_lowest──► the lowest-value pin goes first
        └── the gap "turn end → next request" feeds the TTL policy

A pin holds one reference on each of its blocks in the ``BlockPool``, so pinned blocks are "in
use" for every pool invariant. The TTL policy picks the TTL that maximizes

    P(next turn within t) · benefit  −  cost_rate · t · blocks · pressure

with P from the program's (else all programs') observed gaps, mixed with an exponential prior
while there are few (it fades out by the 8th gap); benefit = prefill tokens saved (blocks ·
block size). Torch-free; every time comes from an injectable clock.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvmanager.block_pool import BlockPool

_MAX_PROGRAMS = 65536  # programs whose gaps are remembered (oldest forgotten first)
_PRIOR_FADE = 8  # observations after which the exponential prior no longer counts
_GRID_S = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class TTLPolicy:
    """Chooses pin TTLs from the empirical distribution of gaps between a program's turns."""

    def __init__(self, max_ttl_s: float, block_size: int, prior_mean_s: float = 30.0,
                 prior_weight: float = 4.0, history: int = 256) -> None:
        self.max_ttl_s = max_ttl_s
        self.block_size = block_size
        self.prior_mean_s = prior_mean_s
        self.prior_weight = prior_weight  # pseudo-observations the exponential prior is worth
        # cost per block-second at pressure 1: holding a block for max_ttl_s costs its benefit
        self.cost_rate = block_size / max_ttl_s
        self._gaps: dict[str, deque[float]] = {}
        self._all: deque[float] = deque(maxlen=history)
        self._history = history
        self._ended: dict[str, float] = {}  # program -> when its last turn ended

    # ------------------------------------------------------------------ observations
    def turn_ended(self, program: str, now: float) -> None:
        self._ended[program] = now
        _bound(self._ended)

    def turn_started(self, program: str, now: float) -> None:
        """The program's next request arrived: record its gap (if a turn of it ended before)."""
        end = self._ended.pop(program, None)
        if end is not None:
            self.observe_gap(program, max(0.0, now - end))

    def forget(self, program: str) -> None:
        """The program finished (its last step): stop tracking it (its gaps stay in the pool)."""
        self._ended.pop(program, None)
        self._gaps.pop(program, None)

    def observe_gap(self, program: str, gap_s: float) -> None:
        self._gaps.setdefault(program, deque(maxlen=64)).append(gap_s)
        _bound(self._gaps)
        self._all.append(gap_s)

    # ------------------------------------------------------------------ model
    def p_within(self, program: str, t: float) -> float:
        """P(the program's next turn arrives within ``t`` seconds of its turn's end)."""
        gaps = self._gaps.get(program) or self._all
        mean = sum(gaps) / len(gaps) if gaps else self.prior_mean_s  # the prior's scale
        prior = 1.0 - math.exp(-t / max(mean, 1e-6))
        n = len(gaps)
        emp = sum(1 for g in gaps if g <= t) / n if n else 0.0
        weight = self.prior_weight * max(0.0, 1.0 - n / _PRIOR_FADE)  # gone after 8 gaps
        return (n * emp + weight * prior) / (n + weight)

    def p_return(self, program: str, elapsed: float, until: float) -> float:
        """P(next turn in (elapsed, until] | not yet arrived after ``elapsed``)."""
        f0 = self.p_within(program, elapsed)
        return (self.p_within(program, until) - f0) / max(1.0 - f0, 1e-9)

    def choose(self, program: str, num_blocks: int, pressure: float) -> float:
        """The best TTL in seconds (0 = not worth pinning) at device ``pressure`` (0..1)."""
        gaps = self._gaps.get(program) or self._all
        candidates = {min(g * 1.25 + 0.5, self.max_ttl_s) for g in gaps}
        candidates.update(t for t in _GRID_S if t < self.max_ttl_s)
        candidates.add(self.max_ttl_s)
        benefit = num_blocks * self.block_size
        best_t, best = 0.0, 0.0
        for t in sorted(candidates):
            score = (self.p_within(program, t) * benefit
                     - self.cost_rate * t * num_blocks * max(pressure, 0.05))
            if score > best + 1e-9:
                best_t, best = t, score
        return best_t


def _bound(d: dict) -> None:
    """Forget the oldest program once a per-program table outgrows ``_MAX_PROGRAMS``."""
    if len(d) > _MAX_PROGRAMS:
        del d[next(iter(d))]


@dataclass
class Pin:
    program: str
    blocks: list[int]
    keys: list[bytes]
    start: float
    expires: float

    @property
    def ttl(self) -> float:
        return self.expires - self.start


class PinTable:
    """The pins of every program: each holds one pool reference per block until it ends."""

    def __init__(self, pool: BlockPool, policy: TTLPolicy, max_pinned_blocks: int,
                 clock: Callable[[], float] = time.monotonic,
                 on_demote: Callable[[bytes, int], None] | None = None) -> None:
        self.pool = pool
        self.policy = policy
        self.max_pinned_blocks = max_pinned_blocks
        self.clock = clock
        self.on_demote = on_demote  # (key, block): save a block one tier down
        self._pins: dict[str, Pin] = {}
        self.hits = 0  # pins claimed by their program's next turn (cumulative)
        self.expired = 0  # pins that ran out (cumulative)
        self.released = 0  # pins released early under memory pressure (cumulative)
        self.ttls: list[float] = []  # chosen TTLs, drained by take_ttls()
        self.protected: str | None = None  # the program being admitted: its pin goes last

    @property
    def num_pinned_blocks(self) -> int:
        return sum(len(p.blocks) for p in self._pins.values())

    def pin_of(self, program: str) -> Pin | None:
        return self._pins.get(program)

    def take_ttls(self) -> list[float]:
        ttls, self.ttls = self.ttls, []
        return ttls

    # ------------------------------------------------------------------ mutations
    def pin(self, program: str, blocks: Sequence[int], keys: Sequence[bytes],
            ttl_s: float | None = None) -> float:
        """Pin ``blocks`` (full, cached, held by the caller) for ``program``; returns the TTL
        (0 = not pinned: not worth it, or no room under ``max_pinned_blocks``). Replaces the
        program's previous pin."""
        now = self.clock()
        self.policy.turn_ended(program, now)
        old = self._pins.pop(program, None)
        ttl = 0.0
        if blocks:
            ttl = ttl_s if ttl_s is not None else self.policy.choose(
                program, len(blocks), self.pool.usage)
            ttl = min(ttl, self.policy.max_ttl_s)
        if ttl > 0 and self._make_room(len(blocks), ttl, program):
            self.pool.touch(blocks)
            self._pins[program] = Pin(program, list(blocks), list(keys), now, now + ttl)
            self.ttls.append(ttl)
        else:
            ttl = 0.0
        if old is not None:
            self.pool.free(old.blocks[::-1])  # after the new touch: shared blocks stay held
        return ttl

    def claim(self, program: str | None, hit_blocks: Sequence[int]) -> bool:
        """The program's next turn was admitted holding ``hit_blocks``: end its pin (the
        sequence holds the blocks now). True (a pin hit) if the hit covered pinned blocks."""
        if program is None:
            return False
        pin = self._pins.pop(program, None)
        if pin is None:
            return False
        hit = bool(set(hit_blocks) & set(pin.blocks))
        self.hits += hit
        self.pool.free(pin.blocks[::-1])
        return hit

    def drop(self, program: str) -> None:
        """Release the program's pin without counting anything (its last step is done)."""
        pin = self._pins.pop(program, None)
        if pin is not None:
            self.pool.free(pin.blocks[::-1])

    def expire(self) -> int:
        """Release every pin past its expiry, demoting blocks only the pin held. Returns how
        many expired."""
        now = self.clock()
        done = [p for p in self._pins.values() if p.expires <= now]
        for pin in done:
            del self._pins[pin.program]
            self._release(pin, demote=True)
        self.expired += len(done)
        return len(done)

    def release_lowest(self) -> bool:
        """Memory pressure: release the pin least likely to pay off. False if none."""
        if not self._pins:
            return False
        pin = min(self._pins.values(),
                  key=lambda p: (p.program == self.protected, self._value(p)))
        del self._pins[pin.program]
        self._release(pin, demote=True)
        self.released += 1
        return True

    def clear(self) -> None:
        """Forget every pin (the device KV is gone)."""
        for pin in self._pins.values():
            self.pool.free(pin.blocks[::-1])
        self._pins.clear()

    def _release(self, pin: Pin, demote: bool) -> None:
        if demote and self.on_demote is not None:
            for b, key in zip(pin.blocks, pin.keys, strict=True):
                if self.pool.ref_count(b) == 1 and self.pool.key_of(b) == key:
                    self.on_demote(key, b)
        self.pool.free(pin.blocks[::-1])

    def _value(self, pin: Pin) -> float:
        """Expected prefill tokens the pin still saves."""
        now = self.clock()
        p = self.policy.p_return(pin.program, now - pin.start, pin.expires - pin.start)
        return p * len(pin.blocks) * self.policy.block_size

    def _make_room(self, num_blocks: int, ttl: float, program: str) -> bool:
        """Fit ``num_blocks`` more under the cap, releasing lower-value pins if needed."""
        value = self.policy.p_within(program, ttl) * num_blocks * self.policy.block_size
        while self.num_pinned_blocks + num_blocks > self.max_pinned_blocks:
            if not self._pins:
                return False
            lowest = min(self._pins.values(), key=self._value)
            if self._value(lowest) >= value:
                return False
            del self._pins[lowest.program]
            self._release(lowest, demote=True)
            self.released += 1
        return True

    # ------------------------------------------------------------------ invariants
    def holders(self) -> list[list[int]]:
        """The block lists the pins hold (one pool reference each), for leak checks."""
        return [p.blocks for p in self._pins.values()]

    def check_integrity(self) -> None:
        for pin in self._pins.values():
            for b, key in zip(pin.blocks, pin.keys, strict=True):
                if self.pool.key_of(b) != key:
                    raise AssertionError(f"pin of {pin.program}: block {b} lost its key")
        if self.num_pinned_blocks > self.max_pinned_blocks:
            raise AssertionError("more pinned blocks than max_pinned_blocks")

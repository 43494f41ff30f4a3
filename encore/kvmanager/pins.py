"""TTL pins for agent programs (Continuum): keep a program's KV on the device between turns.

    turn k ends ──pin(blocks, ttl)──► pinned (a pool reference; never LRU-evicted)
        │                               │
        │ next turn of the program arrives ──awaited──► no longer expires: it is in the queue
        │      next turn of the program ┤──claim──► its sequence holds the blocks (pin hit)
        │                    ttl passes ┤──expire──► demoted to the host tier, then LRU-cached
        │      allocation would fail    └──release_lowest──► the lowest-value pin goes first
        └── the gap "turn end → next request" feeds the TTL policy

A prompt-cache breakpoint (``prompt_cache_breakpoint: {"mode": "explicit", "ttl": ...}``) is
an *explicit* pin of a prefix: it lasts its TTL whatever turns come (no claim ends it) and
yields to pressure only after every turn pin. Each tenant's pins may hold at most
``max_tenant_blocks`` distinct blocks (``PinTable._fit`` says what gives way).

A pin holds one reference on each of its blocks in the ``BlockPool``, so pinned blocks are "in
use" for every pool invariant. The TTL policy picks the TTL that maximizes

    P(next turn within t) · benefit  −  cost_rate · t · blocks · pressure

with P from observed gaps (after the tool the turn called, in any program, once the server has
reported it; else the program's own; else all programs'), mixed with an exponential prior
while there are few (it fades out by the 8th gap); benefit = the prefill a miss would cost
(blocks · block size tokens), times ``miss_cost``: the fraction of that prefill a released
pin's KV costs to get back (1 without a lower tier; a host reload is a fraction of it, so a
pin is worth less and yields sooner when its KV would be demoted to host).

Who waits for whom (Continuum): while other sequences run, a waiting admission does not take a
paused program's pinned KV; it waits for room, unless the pin's KV comes back cheaply
(``miss_cost`` below ``CHEAP_MISS``: demoted to host, it reloads in the step that resumes the
program). Torch-free; every time comes from an injectable clock.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from encore.kvmanager.block_pool import BlockPool

_MAX_PROGRAMS = 65536  # programs whose gaps are remembered (oldest forgotten first)
_MAX_TOOLS = 4096  # tools (sets of function names) whose gaps are remembered
_PRIOR_FADE = 8  # observations after which the exponential prior no longer counts
CHEAP_MISS = 0.5  # a released pin costing less than half its prefill to reload yields freely
_GRID_S = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class TTLPolicy:
    """Chooses pin TTLs from the empirical distribution of gaps between a program's turns:
    those after the same tool (any program's) once the turn is known to have called one
    (``tool_called``), else the program's own, else all programs'."""

    def __init__(self, max_ttl_s: float, block_size: int, prior_mean_s: float = 30.0,
                 prior_weight: float = 4.0, history: int = 256) -> None:
        self.max_ttl_s = max_ttl_s
        self.block_size = block_size
        self.prior_mean_s = prior_mean_s
        self.prior_weight = prior_weight  # pseudo-observations the exponential prior is worth
        # cost per block-second at pressure 1: holding a block for max_ttl_s costs its benefit
        self.cost_rate = block_size / max_ttl_s
        self._gaps: dict[str, deque[float]] = {}
        self._tool_gaps: dict[str, deque[float]] = {}  # tool (names, sorted) -> its gaps
        self._all: deque[float] = deque(maxlen=history)
        self._history = history
        self._ended: dict[str, float] = {}  # program -> when its last turn ended
        self._tool: dict[str, str] = {}  # program -> the tool its last turn called

    # ------------------------------------------------------------------ observations
    def turn_ended(self, program: str, now: float) -> None:
        self._ended[program] = now
        _bound(self._ended)

    def tool_called(self, program: str, tools: Sequence[str]) -> bool:
        """The program's turn that just ended called ``tools`` (names; parallel calls count
        as one tool): its gap is a run of that tool. False if no turn of it is pending."""
        if program not in self._ended or not tools:
            return False
        self._tool[program] = ",".join(sorted(set(tools)))
        _bound(self._tool)
        return True

    def turn_started(self, program: str, now: float) -> None:
        """The program's next request arrived: record its gap (if a turn of it ended before),
        also as a run of the tool that turn called."""
        end = self._ended.pop(program, None)
        tool = self._tool.pop(program, None)
        if end is not None:
            gap = max(0.0, now - end)
            self.observe_gap(program, gap)
            if tool is not None:
                self._tool_gaps.setdefault(tool, deque(maxlen=self._history)).append(gap)
                _bound(self._tool_gaps, _MAX_TOOLS)

    def forget(self, program: str) -> None:
        """The program finished (its last step): stop tracking it (its gaps stay in the pool)."""
        self._ended.pop(program, None)
        self._tool.pop(program, None)
        self._gaps.pop(program, None)

    def observe_gap(self, program: str, gap_s: float) -> None:
        self._gaps.setdefault(program, deque(maxlen=64)).append(gap_s)
        _bound(self._gaps)
        self._all.append(gap_s)

    # ------------------------------------------------------------------ model
    def _gaps_for(self, program: str) -> deque[float]:
        """The gaps that predict the program's next one (see the class docstring)."""
        tool = self._tool.get(program)
        return ((tool is not None and self._tool_gaps.get(tool)) or self._gaps.get(program)
                or self._all)

    def p_within(self, program: str, t: float) -> float:
        """P(the program's next turn arrives within ``t`` seconds of its turn's end)."""
        gaps = self._gaps_for(program)
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

    def choose(self, program: str, num_blocks: int, pressure: float,
               miss_cost: float = 1.0) -> float:
        """The best TTL in seconds (0 = not worth pinning) at device ``pressure`` (0..1), when
        a miss costs ``miss_cost`` of the blocks' prefill."""
        gaps = self._gaps_for(program)
        candidates = {min(g * 1.25 + 0.5, self.max_ttl_s) for g in gaps}
        candidates.update(t for t in _GRID_S if t < self.max_ttl_s)
        candidates.add(self.max_ttl_s)
        benefit = num_blocks * self.block_size * miss_cost
        best_t, best = 0.0, 0.0
        for t in sorted(candidates):
            score = (self.p_within(program, t) * benefit
                     - self.cost_rate * t * num_blocks * max(pressure, 0.05))
            if score > best + 1e-9:
                best_t, best = t, score
        return best_t


def _bound(d: dict, limit: int = _MAX_PROGRAMS) -> None:
    """Forget the oldest entry once a per-program (or per-tool) table outgrows ``limit``."""
    if len(d) > limit:
        del d[next(iter(d))]


@dataclass(frozen=True)
class Admission:
    """The waiting sequence whose admission needs room, when pins may have to yield for it.

    Its ``program``'s pins yield last (the admission is about to claim them). While
    ``others_running``, Continuum's rule holds: an admission waits for room instead of taking
    a paused program's KV, so only pins that reload cheaply yield; pressure from running
    sequences (no ``Admission``), or an admission into an otherwise idle engine, releases any.
    """

    program: str | None
    others_running: bool


@dataclass
class Pin:
    """Leading blocks of a sequence, held for ``program`` (of ``tenant``) until ``expires``.

    A turn pin (``explicit`` False) ends when the program's next turn claims it; an explicit
    pin (a prompt-cache breakpoint) lasts its TTL whatever turns come.
    """

    program: str
    blocks: list[int]
    keys: list[bytes]
    start: float
    expires: float
    tenant: str | None = None  # the sequence's cache salt
    explicit: bool = False
    awaited: bool = False  # the program's next turn arrived and waits for admission
    fixed: bool = False  # the request chose the TTL (the policy never changes it)
    soft: bool = False  # an Anthropic cache_control pin: each hit on it restarts its TTL

    @property
    def ttl(self) -> float:
        return self.expires - self.start


class PinTable:
    """Every pin; each holds one pool reference per block until it ends.

    Turn pins are kept per program (a turn's pin replaces its previous one); explicit pins per
    prefix, named by their last block's key (pinning a pinned prefix again keeps the later
    expiry). Pins may overlap (a breakpoint inside a turn, nested breakpoints): a block stays
    until its last pin ends, and counts once against ``max_pinned_blocks`` and against its
    tenant's ``max_tenant_blocks``. Which pin yields first (pressure, caps, quota): see
    ``_rank``.
    """

    def __init__(self, pool: BlockPool, policy: TTLPolicy, max_pinned_blocks: int,
                 clock: Callable[[], float] = time.monotonic,
                 on_demote: Callable[[bytes, int], None] | None = None,
                 max_tenant_blocks: int | None = None,
                 miss_cost: Callable[[int], float] = lambda blocks: 1.0) -> None:
        """``miss_cost(blocks)``: what that many released blocks cost to get back, as a
        fraction of their prefill (the tier hierarchy's estimate; 1 = recomputed)."""
        self.pool = pool
        self.policy = policy
        self.max_pinned_blocks = max_pinned_blocks
        self.max_tenant_blocks = max_tenant_blocks  # per tenant (cache salt); None = no quota
        self.clock = clock
        self.on_demote = on_demote  # (key, block): save a block one tier down
        self.miss_cost = miss_cost
        self._turns: dict[str, Pin] = {}  # program -> its last turn's pin
        self._prefixes: dict[bytes, Pin] = {}  # last block's key -> explicit pin
        self._held: Counter[int] = Counter()  # block -> pins holding it
        self._tenant_blocks: Counter[str | None] = Counter()  # tenant -> distinct pinned blocks
        self.hits = 0  # pins claimed by their program's next turn (cumulative)
        self.expired = 0  # pins that ran out (cumulative)
        self.released = 0  # pins released early under memory pressure or a cap (cumulative)
        self.ttls: list[float] = []  # chosen TTLs, drained by take_ttls()

    @property
    def num_pinned_blocks(self) -> int:
        """Distinct blocks held by pins."""
        return len(self._held)

    def tenant_blocks(self, tenant: str | None) -> int:
        """Distinct blocks held by the pins of ``tenant``."""
        return self._tenant_blocks[tenant]

    def pin_of(self, program: str) -> Pin | None:
        """The program's turn pin, if any."""
        return self._turns.get(program)

    def all_pins(self) -> list[Pin]:
        """Turn pins, then explicit pins."""
        return [*self._turns.values(), *self._prefixes.values()]

    def take_ttls(self) -> list[float]:
        ttls, self.ttls = self.ttls, []
        return ttls

    # ------------------------------------------------------------------ mutations
    def pin(self, program: str, blocks: Sequence[int], keys: Sequence[bytes],
            ttl_s: float | None = None, tenant: str | None = None) -> float:
        """Pin a finished turn's ``blocks`` (full, cached, held by the caller) for ``program``;
        returns the TTL (0 = not pinned: not worth it, or no room). Replaces the program's
        previous turn pin. Caps and quota may release other pins or cut the tail (``_fit``)."""
        now = self.clock()
        self.policy.turn_ended(program, now)
        old = self._turns.get(program)
        if old is not None:
            self._unhold(old)  # its references go after the new pin's: shared blocks stay held
        ttl = 0.0
        if blocks:
            ttl = ttl_s if ttl_s is not None else self._chosen_ttl(program, len(blocks))
            ttl = min(ttl, self.policy.max_ttl_s)
        pin = None
        if ttl > 0:
            pin = self._fit(Pin(program, list(blocks), list(keys), now, now + ttl, tenant,
                                fixed=ttl_s is not None))
        if pin is not None:
            self._hold(pin)
            self.ttls.append(ttl)
        if old is not None:
            self.pool.free(old.blocks[::-1])
        return ttl if pin is not None else 0.0

    def pin_breakpoint(self, program: str, blocks: Sequence[int], keys: Sequence[bytes],
                       ttl_s: float, tenant: str | None = None, soft: bool = False) -> float:
        """Explicitly pin the prefix ``blocks`` (full, cached, held by the caller) for ``ttl_s``
        (at most the policy's max TTL); no claim ends it. Pinning a pinned prefix again keeps
        the later expiry. ``soft``: every later hit on the whole prefix restarts the TTL
        (``refresh``). Returns the TTL (0 = not pinned: empty, or no room)."""
        now = self.clock()
        ttl = min(ttl_s, self.policy.max_ttl_s)
        if not blocks or ttl <= 0:
            return 0.0
        pin = self._fit(Pin(program, list(blocks), list(keys), now, now + ttl, tenant, True,
                            soft=soft))
        if pin is None:
            return 0.0
        same = self._prefixes.get(pin.keys[-1])
        if same is not None:  # the same prefix (the same blocks): extend, never shorten
            same.expires = max(same.expires, pin.expires)
            same.soft = same.soft or soft
        else:
            self._hold(pin)
        self.ttls.append(ttl)
        return ttl

    def refresh(self, hit_blocks: Sequence[int]) -> int:
        """A sequence was admitted holding ``hit_blocks``: every soft pin whose whole prefix
        it hit starts its TTL again (Anthropic: a cache hit refreshes the entry). Returns
        how many were refreshed."""
        soft = [p for p in self._prefixes.values() if p.soft]
        if not soft or not hit_blocks:
            return 0
        hit, now, n = set(hit_blocks), self.clock(), 0
        for pin in soft:
            if hit.issuperset(pin.blocks):
                ttl = pin.ttl
                pin.start, pin.expires = now, max(pin.expires, now + ttl)
                n += 1
        return n

    def claim(self, program: str | None, hit_blocks: Sequence[int]) -> bool:
        """The program's next turn was admitted holding ``hit_blocks``: end its turn pin (the
        sequence holds the blocks now; explicit pins stay). True (a pin hit) if the hit
        covered blocks of that pin."""
        if program is None:
            return False
        pin = self._turns.get(program)
        if pin is None:
            return False
        hit = bool(set(hit_blocks) & set(pin.blocks))
        self.hits += hit
        self._release(pin, demote=False)
        return hit

    def tool_called(self, program: str, tools: Sequence[str]) -> None:
        """The program's last turn called ``tools``: its pin's TTL is chosen again from that
        tool's gaps, from the pin's start (a TTL the request asked for stays; a TTL of 0
        expires it at the next step, demoted)."""
        if not self.policy.tool_called(program, tools):
            return
        pin = self._turns.get(program)
        if pin is None or pin.fixed or pin.awaited:
            return
        pin.expires = pin.start + self._chosen_ttl(program, len(pin.blocks))

    def awaited(self, program: str) -> None:
        """The program's next turn arrived: its turn pin no longer expires; it ends when that
        turn is admitted (``claim``) or gives up (``abandoned``). The TTL covers the tool's
        run, not the turn's wait in the queue."""
        pin = self._turns.get(program)
        if pin is not None:
            pin.awaited = True

    def abandoned(self, program: str) -> None:
        """The program's awaited turn ended without being admitted (aborted): its pin expires
        as before (at once if its TTL has passed)."""
        pin = self._turns.get(program)
        if pin is not None:
            pin.awaited = False

    def drop(self, program: str) -> None:
        """Release the program's turn pin without counting anything (its last step is done);
        its explicit pins run out their TTLs."""
        pin = self._turns.get(program)
        if pin is not None:
            self._release(pin, demote=False)

    def expire(self) -> int:
        """Release every pin past its expiry, demoting blocks no one else holds. Returns how
        many expired."""
        now = self.clock()
        done = [p for p in self.all_pins() if p.expires <= now and not p.awaited]
        for pin in done:
            self._release(pin, demote=True)
        self.expired += len(done)
        return len(done)

    def release_lowest(self, admission: Admission | None = None) -> bool:
        """Memory pressure: release the pin that ranks lowest (``_rank``). False if none. For
        an ``admission`` while others run, only pins whose KV comes back cheaply
        (``CHEAP_MISS``) count (see ``Admission``)."""
        pins = self.all_pins()
        if admission is not None and admission.others_running:
            pins = [p for p in pins if self.miss_cost(len(p.blocks)) < CHEAP_MISS]
        if not pins:
            return False
        protected = admission.program if admission is not None else None
        self._release(min(pins, key=lambda p: self._rank(p, protected)), demote=True)
        self.released += 1
        return True

    def clear(self) -> None:
        """Forget every pin (the device KV is gone)."""
        for pin in self.all_pins():
            self._release(pin, demote=False)

    # ------------------------------------------------------------------ internals
    def _hold(self, pin: Pin) -> None:
        """Register ``pin`` and take its pool references."""
        if pin.explicit:
            self._prefixes[pin.keys[-1]] = pin
        else:
            self._turns[pin.program] = pin
        self.pool.touch(pin.blocks)
        for b in pin.blocks:
            if not self._held[b]:
                self._tenant_blocks[pin.tenant] += 1
            self._held[b] += 1

    def _unhold(self, pin: Pin) -> None:
        """Unregister ``pin``; its pool references stay for the caller to free."""
        if pin.explicit:
            del self._prefixes[pin.keys[-1]]
        else:
            del self._turns[pin.program]
        for b in pin.blocks:
            self._held[b] -= 1
            if not self._held[b]:
                del self._held[b]
                self._tenant_blocks[pin.tenant] -= 1
        if self._tenant_blocks[pin.tenant] <= 0:
            self._tenant_blocks.pop(pin.tenant, None)

    def _release(self, pin: Pin, demote: bool) -> None:
        self._unhold(pin)
        if demote and self.on_demote is not None:
            for b, key in zip(pin.blocks, pin.keys, strict=True):
                if self.pool.ref_count(b) == 1 and self.pool.key_of(b) == key:
                    self.on_demote(key, b)
        self.pool.free(pin.blocks[::-1])

    def _rank(self, pin: Pin, protected: str | None = None) -> tuple[bool, bool, float]:
        """Lowest yields first: pins of other programs than ``protected`` (the one being
        admitted), then turn pins before explicit ones (a client asked for those), then the
        least value."""
        return pin.program == protected, pin.explicit, self._value(pin)

    def _chosen_ttl(self, program: str, num_blocks: int) -> float:
        """The policy's TTL (at most its max) for a pin of ``num_blocks`` now."""
        return self.policy.choose(program, num_blocks, self.pool.usage,
                                  self.miss_cost(num_blocks))

    def _value(self, pin: Pin) -> float:
        """Expected prefill tokens the pin still saves (an explicit pin's are certain), priced
        at what a miss would cost (``miss_cost``)."""
        tokens = len(pin.blocks) * self.policy.block_size * self.miss_cost(len(pin.blocks))
        if pin.explicit or pin.awaited:
            return float(tokens)
        now = self.clock()
        return self.policy.p_return(pin.program, now - pin.start, pin.expires - pin.start) * tokens

    def _fit(self, pin: Pin) -> Pin | None:
        """Make room for the new ``pin``: returns it, its tail perhaps cut, or None (no room).

        Tenant quota: a pin alone over the quota keeps its leading blocks; then the tenant's
        pins that rank below it go, lowest first, until it fits; what still does not fit is
        cut off its tail (a prefix's head is what later requests hit). Other tenants' pins
        never go for a tenant's quota. Global cap (``max_pinned_blocks``): pins of any tenant
        that rank below it go, lowest first; if that is not enough it is not pinned.
        """
        quota, tenant = self.max_tenant_blocks, pin.tenant
        if quota is not None:
            pin.blocks, pin.keys = pin.blocks[:quota], pin.keys[:quota]
            self._release_below(pin, lambda: self._tenant_blocks[tenant], quota,
                                lambda p: p.tenant == tenant)
            n = self._fitting(pin.blocks, quota - self._tenant_blocks[tenant])
            if n == 0:
                return None
            pin.blocks, pin.keys = pin.blocks[:n], pin.keys[:n]
        self._release_below(pin, lambda: len(self._held), self.max_pinned_blocks,
                            lambda p: True)
        if len(self._held) + self._num_new(pin.blocks) > self.max_pinned_blocks:
            return None
        return pin

    def _release_below(self, pin: Pin, used: Callable[[], int], cap: int,
                       among: Callable[[Pin], bool]) -> None:
        """Release pins ``among`` that rank below ``pin``, lowest first, until ``used()`` plus
        its new blocks fits under ``cap``."""
        rank = self._rank(pin)
        while used() + self._num_new(pin.blocks) > cap:
            others = [p for p in self.all_pins() if among(p)]
            lowest = min(others, key=self._rank, default=None)
            if lowest is None or self._rank(lowest) >= rank:
                return
            self._release(lowest, demote=True)
            self.released += 1

    def _num_new(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` no pin holds yet."""
        return sum(1 for b in blocks if b not in self._held)

    def _fitting(self, blocks: Sequence[int], room: int) -> int:
        """How many leading ``blocks`` fit when ``room`` more distinct blocks may be pinned."""
        n = 0
        for b in blocks:
            if b not in self._held:
                if room <= 0:
                    break
                room -= 1
            n += 1
        return n

    # ------------------------------------------------------------------ invariants
    def holders(self) -> list[list[int]]:
        """The block lists the pins hold (one pool reference each), for leak checks."""
        return [p.blocks for p in self.all_pins()]

    def check_integrity(self) -> None:
        """Keys still match, the counts agree with the pins, the caps and quota hold."""
        held: Counter[int] = Counter()
        owner: dict[int, str | None] = {}
        for pin in self.all_pins():
            for b, key in zip(pin.blocks, pin.keys, strict=True):
                if self.pool.key_of(b) != key:
                    raise AssertionError(f"pin of {pin.program}: block {b} lost its key")
                if owner.setdefault(b, pin.tenant) != pin.tenant:
                    raise AssertionError(f"block {b} is pinned by two tenants")
            held.update(pin.blocks)
        if held != self._held or Counter(owner.values()) != self._tenant_blocks:
            raise AssertionError("pin counts disagree with the pins")
        if self.num_pinned_blocks > self.max_pinned_blocks:
            raise AssertionError("more pinned blocks than max_pinned_blocks")
        quota = self.max_tenant_blocks
        if quota is not None and any(n > quota for n in self._tenant_blocks.values()):
            raise AssertionError("a tenant's pins hold more than max_tenant_blocks")

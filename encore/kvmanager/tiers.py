"""The index of one lower KV tier (host or disk): key → slot, LRU, two-phase states.

Every entry is in one of three states:

    storing   a store was prepared; the bytes are not there yet   (never loadable, never evicted)
    ready     the store completed                                  (loadable; evictable if unpinned)
    ready + pins > 0   loads in flight read it                     (not evictable)

    prepare_store(keys) ──► storing ──complete_store(ok=True)──► ready ──prepare_load──► pinned
                              └──complete_store(ok=False)──► gone        complete_load ──┘

The LRU order (first = evicted first) covers every entry; ``touch`` and loads move an entry
to the most-recent end. Slots are small integers (the host pool's rows); the disk tier uses
them only as an identity (its files are named by key). The index is pure bookkeeping: the
worker moves the bytes (``encore.worker.tiers``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice

STORING, READY = "storing", "ready"


@dataclass
class _Entry:
    slot: int
    state: str = STORING
    pins: int = 0


@dataclass
class StorePlan:
    """What ``prepare_store`` decided: new (key, slot) entries and the (key, slot) it evicted.

    Keys already in the tier are skipped (not in ``stored``)."""

    stored: list[tuple[bytes, int]] = field(default_factory=list)
    evicted: list[tuple[bytes, int]] = field(default_factory=list)


class TierIndex:
    """Where each key lives in one tier, with capacity ``num_slots`` and LRU eviction."""

    def __init__(self, name: str, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"tier {name}: num_slots must be >= 1, got {num_slots}")
        self.name = name
        self.num_slots = num_slots
        self.enabled = True
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._free_slots = list(range(num_slots - 1, -1, -1))  # pop() gives the lowest first
        self.evictions = 0

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def slot_of(self, key: bytes) -> int | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.slot

    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` are ready (loadable) here. Changes nothing."""
        if not self.enabled:
            return 0
        n = 0
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or entry.state != READY:
                break
            n += 1
        return n

    def lru_order(self) -> list[bytes]:
        """Keys, next evicted first (for tests and debugging)."""
        return list(self._entries)

    # ------------------------------------------------------------------ loads
    def prepare_load(self, keys: Sequence[bytes]) -> list[int]:
        """Pin ready ``keys`` (so they survive until ``complete_load``); return their slots."""
        slots = []
        for key in keys:
            entry = self._entries[key]
            if entry.state != READY:
                raise AssertionError(f"tier {self.name}: load of a key that is {entry.state}")
            entry.pins += 1
            self._entries.move_to_end(key)
            slots.append(entry.slot)
        return slots

    def complete_load(self, key: bytes, ok: bool = True) -> None:
        """Unpin one load of ``key``. A failed load (bad data) drops the entry."""
        entry = self._entries[key]
        if entry.pins <= 0:
            raise AssertionError(f"tier {self.name}: complete_load without a pin")
        entry.pins -= 1
        if not ok and entry.pins == 0:
            self._drop(key)

    def touch(self, keys: Iterable[bytes]) -> None:
        """Mark ``keys`` (those present) most recently used."""
        for key in keys:
            if key in self._entries:
                self._entries.move_to_end(key)

    # ------------------------------------------------------------------ stores
    def prepare_store(self, keys: Sequence[bytes]) -> StorePlan | None:
        """Reserve slots for the ``keys`` not yet here, evicting ready, unpinned LRU entries.

        All or nothing: None (and no change) when the tier is off or cannot make room.
        New entries are ``storing`` until ``complete_store``.
        """
        if not self.enabled:
            return None
        new = list(dict.fromkeys(k for k in keys if k not in self._entries))
        lacking = len(new) - len(self._free_slots)
        victims = self._victims(lacking) if lacking > 0 else []
        if victims is None:
            return None
        plan = StorePlan()
        for key in victims:
            plan.evicted.append((key, self._entries[key].slot))
            self._drop(key)
            self.evictions += 1
        for key in new:
            slot = self._free_slots.pop()
            self._entries[key] = _Entry(slot)
            plan.stored.append((key, slot))
        return plan

    def num_free(self) -> int:
        return len(self._free_slots)

    def cold_keys(self) -> Iterator[bytes]:
        """Ready, unpinned keys, least recently used first (eviction candidates), lazily."""
        return (key for key, entry in self._entries.items()
                if entry.state == READY and entry.pins == 0)

    def evict(self, key: bytes) -> bool:
        """Drop ``key`` if it is ready and unpinned (its copy one tier down is done)."""
        entry = self._entries.get(key)
        if entry is None or entry.state != READY or entry.pins:
            return False
        self._drop(key)
        self.evictions += 1
        return True

    def _victims(self, n: int) -> list[bytes] | None:
        out = list(islice(self.cold_keys(), n))
        return out if len(out) == n else None

    def complete_store(self, key: bytes, ok: bool) -> None:
        """The store of ``key`` finished: it becomes loadable, or (failed) disappears."""
        entry = self._entries.get(key)
        if entry is None or entry.state != STORING:
            raise AssertionError(f"tier {self.name}: complete_store of a key not being stored")
        if ok:
            entry.state = READY
        else:
            self._drop(key)

    def insert_ready(self, key: bytes) -> bool:
        """Add an entry whose bytes already exist (disk index rebuilt at start-up); False when
        full or present."""
        if key in self._entries or not self._free_slots:
            return False
        self._entries[key] = _Entry(self._free_slots.pop(), READY)
        return True

    def reset(self) -> None:
        """Forget every entry (the worker that held the bytes is gone)."""
        self._entries.clear()
        self._free_slots = list(range(self.num_slots - 1, -1, -1))

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self._free_slots.append(entry.slot)

    # ------------------------------------------------------------------ invariants
    def check_integrity(self) -> None:
        """Slots are unique and conserved; states and pins are valid."""
        used = [e.slot for e in self._entries.values()]
        if len(set(used)) != len(used):
            raise AssertionError(f"tier {self.name}: a slot is used twice")
        if set(used) & set(self._free_slots) or len(used) + len(self._free_slots) != self.num_slots:
            raise AssertionError(f"tier {self.name}: slots leaked or double-freed")
        for key, e in self._entries.items():
            if e.pins < 0 or e.state not in (STORING, READY):
                raise AssertionError(f"tier {self.name}: bad entry {key.hex()[:8]} {e}")
            if e.state == STORING and e.pins:
                raise AssertionError(f"tier {self.name}: a storing entry is pinned")

    def num_busy(self) -> int:
        """Entries being stored or loaded (zero once every transfer has completed)."""
        return sum(1 for e in self._entries.values() if e.state == STORING or e.pins)

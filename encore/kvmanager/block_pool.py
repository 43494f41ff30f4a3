"""The device block pool: ref counts, a key → block map of cached full blocks, an LRU free queue.

Every usable block is in exactly one of three states:

    in use            ref_cnt > 0          (held by >= 1 sequence; may also be cached)
    cached, unused    ref_cnt == 0, key    (in the free queue; reusable on a key hit)
    free              ref_cnt == 0, no key (in the free queue)

The free queue is an LRU list (head = evicted first). A freed *cached* block goes to the tail,
so it survives as long as possible; a freed *uncached* block goes to the head, since reusing it
costs nothing. Allocation takes from the head; taking a cached block evicts it (drops its key).

Block 0 is the NULL block: never allocated, never freed, never cached. The worker pads block
tables with 0, so padded slots (e.g. of CUDA-graph batches) write into a block no sequence owns.
The pool therefore has ``num_blocks - 1`` usable blocks, ids ``1 .. num_blocks - 1``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

NULL_BLOCK = 0


class BlockPool:
    """Owns the ref count and the cache key of every device block (one truth per fact)."""

    def __init__(self, num_blocks: int, enable_caching: bool = True,
                 on_evict: Callable[[bytes, int], None] | None = None) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: need >= 2 (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks
        self._key: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        # LRU free queue: insertion order is eviction order (first = evicted first).
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.evictions = 0
        self.on_evict = on_evict  # (key, block) of a cached block about to be reused

    # ------------------------------------------------------------------ queries
    @property
    def num_usable(self) -> int:
        """Blocks a sequence could ever hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks allocatable now (free plus cached-but-unused, which are evicted on demand)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks that carry a cache key (in use or not)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by sequences (0..1)."""
        return 1.0 - len(self._free) / self.num_usable

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def key_of(self, block_id: int) -> bytes | None:
        return self._key[block_id]

    def get_cached_block(self, key: bytes) -> int | None:
        """The block holding the KV for ``key``, or None. Does not change any state."""
        return self._cached.get(key)

    def free_queue_order(self) -> list[int]:
        """The free queue, head (next evicted) first. For tests and debugging."""
        return list(self._free)

    # ------------------------------------------------------------------ mutations
    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on each (cached) block, pulling unused ones off the free queue."""
        for b in block_ids:
            self._check_real(b)
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """``n`` blocks with ref count 1, from the head of the free queue; None if no room.

        Taking a cached block evicts it: its key is dropped from the map. Nothing changes
        when there is no room.
        """
        if n > len(self._free):
            return None
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._evict(b)
            self._ref[b] = 1
            out.append(b)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block, in the order given.

        Blocks whose count reaches 0 join the free queue in that order: cached ones at the
        tail, uncached ones at the head. Pass a sequence's blocks in reverse so its tail
        blocks are evicted before its (more shareable) head blocks.
        """
        for b in block_ids:
            self._check_real(b)
            if self._ref[b] <= 0:
                raise AssertionError(f"block {b} freed with ref_cnt {self._ref[b]} (double free)")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None
                if self._key[b] is None:
                    self._free.move_to_end(b, last=False)

    def cache_full_blocks(self, block_ids: Sequence[int], keys: Sequence[bytes]) -> None:
        """Register full, in-use blocks under their keys so later sequences can share them.

        A block that already has a key keeps it. When another block already holds the same
        key (the same content computed twice), the map keeps the first and this block stays
        uncached.
        """
        if not self.enable_caching:
            return
        for b, key in zip(block_ids, keys, strict=True):
            self._check_real(b)
            if self._ref[b] <= 0:
                raise AssertionError(f"block {b} cached while unreferenced")
            if self._key[b] is not None:
                if self._key[b] != key:
                    raise AssertionError(f"block {b} re-cached under a different key")
                continue
            if key not in self._cached:
                self._cached[key] = b
                self._key[b] = key

    def reset_cache(self) -> bool:
        """Forget every cached key (e.g. the worker restarted with empty KV tensors).

        Only when no block is in use; returns whether it did. Freed blocks keep LRU order.
        """
        if len(self._free) != self.num_usable:
            return False
        for b in self._cached.values():
            self._key[b] = None
        self._cached.clear()
        return True

    def _evict(self, b: int) -> None:
        key = self._key[b]
        if key is not None:
            if self.on_evict is not None:
                self.on_evict(key, b)
            del self._cached[key]
            self._key[b] = None
            self.evictions += 1

    def _check_real(self, b: int) -> None:
        if not 0 < b < self.num_blocks:
            raise AssertionError(f"block id {b} is the null block or out of range")

    # ------------------------------------------------------------------ invariants
    def check_integrity(self) -> None:
        """Raise AssertionError on any inconsistency between counts, free queue and key map."""
        free = cached_unused = in_use = 0
        for b in range(1, self.num_blocks):
            ref, key, queued = self._ref[b], self._key[b], b in self._free
            if ref < 0:
                raise AssertionError(f"block {b} has negative ref_cnt {ref}")
            if (ref == 0) != queued:
                raise AssertionError(f"block {b}: ref_cnt {ref} but in free queue: {queued}")
            if key is not None and self._cached.get(key) != b:
                raise AssertionError(f"block {b} has a key the map does not point back to it")
            if ref > 0:
                in_use += 1
            elif key is None:
                free += 1
            else:
                cached_unused += 1
        self._check_totals(free, cached_unused, in_use)

    def _check_totals(self, free: int, cached_unused: int, in_use: int) -> None:
        if self._ref[NULL_BLOCK] != 0 or self._key[NULL_BLOCK] is not None or 0 in self._free:
            raise AssertionError("the null block 0 was allocated, cached or queued")
        if free + cached_unused + in_use != self.num_usable:
            raise AssertionError(
                f"free {free} + cached {cached_unused} + in use {in_use} != {self.num_usable}"
            )
        if len(self._free) != free + cached_unused:
            raise AssertionError(
                f"free queue has {len(self._free)} entries, expected {free + cached_unused}"
            )
        for key, b in self._cached.items():
            if self._key[b] != key:
                raise AssertionError(f"key map points to block {b}, which holds another key")

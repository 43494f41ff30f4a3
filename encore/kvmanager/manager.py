"""KV cache bookkeeping per sequence: block tables, prefix-cache lookup, caching of full blocks.

A sequence's tokens and its blocks (block size 4 here):

    tokens  | t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 .. .. |
    blocks  |   b7 (hit)  |   b3 (new)  |   b9 (new)  |
            <- computed -><---- computed this step ---->
    keys       k0 = H(-, t0..t3, salt)   k1 = H(k0, t4..t7)   (b9 not full: no key yet)

A block gets its key as soon as it is *allocated* for tokens that the step being scheduled
will fill (the same-step trick): a later sequence in the same step can then share it. That is
safe because the worker writes all new K/V of a layer before any sequence attends, and it
relies on ``schedule`` and ``update_from_output`` alternating (no step is skipped once
scheduled).

The manager never imports the scheduler: a sequence is anything with the ``KVSeq`` attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from encore.kvmanager.block_pool import BlockPool
from encore.kvmanager.hashing import BlockHasher
from encore.kvmanager.pins import Admission, PinTable
from encore.kvmanager.tiered import TieredCache


class KVSeq(Protocol):
    """What the manager reads from a sequence."""

    @property
    def seq_id(self) -> str: ...
    @property
    def all_token_ids(self) -> Sequence[int]: ...  # prompt + output tokens known so far
    @property
    def num_computed_tokens(self) -> int: ...  # tokens whose K/V is already in its blocks
    @property
    def cache_salt(self) -> str | None: ...


class KVCacheManager:
    """Allocates blocks to sequences and shares identical full-block prefixes between them."""

    def __init__(self, pool: BlockPool, block_size: int, hasher: BlockHasher,
                 tiers: TieredCache | None = None, pins: PinTable | None = None) -> None:
        """Collaborators come built and connected (``encore.kvmanager.wiring.build_kv``):
        the pool reports evictions to ``tiers``, ``pins`` hold references on the pool."""
        self.block_size = block_size
        self.pool = pool
        self.enable_prefix_caching = pool.enable_caching
        self.hasher = hasher
        self.tiers = tiers
        self.pins = pins  # TTL pins of agent programs
        self._blocks: dict[str, list[int]] = {}
        self._keys: dict[str, list[bytes]] = {}  # keys of a sequence's leading full blocks
        self._num_registered: dict[str, int] = {}  # leading blocks already offered to the map
        self.prefix_queries = 0  # tokens looked up (cumulative)
        self.prefix_hits = 0  # tokens found, on the device or loaded from a tier (cumulative)
        self.device_hits = 0  # tokens found on the device (cumulative)
        self._orphans: set[str] = set()  # freed while loads into their blocks are in flight
        self._held: dict[str, list[int]] = {}  # extra references (chunk blocks a blend reads)
        self._cache_limit: dict[str, int] = {}  # blocks past this index are never registered
        self._prefetch: dict[str, tuple[list[int], list[bytes]]] = {}  # chunk loads in flight

    # ------------------------------------------------------------------ queries
    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_usable_blocks(self) -> int:
        return self.pool.num_usable

    def block_table(self, seq_id: str) -> list[int]:
        """The sequence's blocks in position order (the live list; do not mutate)."""
        return self._blocks.get(seq_id, [])

    def get_computed_blocks(self, seq: KVSeq) -> tuple[list[int], int]:
        """Longest run of cached full blocks that prefixes ``seq``: (block ids, tokens).

        Never covers every token: at least the last known token is left to compute so the
        step produces logits to sample from. Takes no references (``allocate_slots`` does).
        """
        if not self.enable_prefix_caching:
            return [], 0
        tokens = seq.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        keys = self._seq_keys(seq, max_blocks)
        hits: list[int] = []
        for key in keys[:max_blocks]:
            b = self.pool.get_cached_block(key)
            if b is None:
                break
            hits.append(b)
        return hits, len(hits) * self.block_size

    # ------------------------------------------------------------------ mutations
    def allocate_slots(
        self, seq: KVSeq, num_new_tokens: int, computed_blocks: Sequence[int] = (),
        admission: Admission | None = None,
    ) -> list[int] | None:
        """Make room for ``num_new_tokens`` after the computed ones; return the new block ids.

        ``computed_blocks`` (from ``get_computed_blocks``, only on a sequence's first
        allocation) are referenced and become the head of its table; their tokens count as
        computed after ``seq.num_computed_tokens``. Returns None and changes nothing when the
        pool has no room. Registers every block filled by the end of this step in the map.
        ``admission``: ``seq`` is being admitted (how TTL pins yield for it, ``Admission``).
        """
        if num_new_tokens <= 0:
            raise ValueError(f"{seq.seq_id}: num_new_tokens must be >= 1, got {num_new_tokens}")
        table = self._blocks.setdefault(seq.seq_id, [])
        if computed_blocks and table:
            raise AssertionError(f"{seq.seq_id}: prefix hits on a sequence that has blocks")
        num_hit_tokens = len(computed_blocks) * self.block_size
        total = seq.num_computed_tokens + num_hit_tokens + num_new_tokens
        need = max(0, -(-total // self.block_size) - len(table) - len(computed_blocks))
        if not self._has_room(need, computed_blocks, admission):
            if not table:
                del self._blocks[seq.seq_id]
            return None
        first = not table
        self.pool.touch(computed_blocks)
        new = self.pool.allocate(need)
        assert new is not None  # room was checked above
        table.extend(computed_blocks)
        table.extend(new)
        if first:
            self._record_lookup(seq, num_hit_tokens)
            self._num_registered[seq.seq_id] = len(computed_blocks)
        self._register_full_blocks(seq, total)
        return new

    def _has_room(self, need: int, hits: Sequence[int],
                  admission: Admission | None = None) -> bool:
        """Whether ``need`` blocks fit besides the unreferenced ``hits``; releases TTL pins,
        lowest value first, only when it would otherwise fail."""
        while True:
            evictable_hits = sum(1 for b in hits if self.pool.ref_count(b) == 0)
            if need <= self.pool.num_free - evictable_hits:
                return True
            if self.pins is None or not self.pins.release_lowest(admission):
                return False

    def pin_prefix(self, seq: KVSeq, program: str, ttl_s: float | None,
                   num_tokens: int | None = None, soft: bool = False) -> float:
        """Pin the leading cached full blocks of ``seq`` (still held) for ``program``, in its
        tenant (``seq.cache_salt``); returns the TTL (0 = not pinned).

        Without ``num_tokens``: the turn's pin (TTL from the policy unless ``ttl_s``). With it:
        an explicit breakpoint pin, for ``ttl_s``, of the blocks wholly inside the first
        ``num_tokens`` tokens (``num_tokens // block_size`` blocks at most); ``soft``: a hit
        refreshes it (``PinTable.refresh``).
        """
        if self.pins is None:
            return 0.0
        table, keys = self._blocks.get(seq.seq_id, []), self._keys.get(seq.seq_id, [])
        limit = min(len(table), len(keys))
        if num_tokens is not None:
            limit = min(limit, num_tokens // self.block_size)
        n = 0
        while n < limit and self.pool.key_of(table[n]) == keys[n]:
            n += 1
        if num_tokens is None:
            return self.pins.pin(program, table[:n], keys[:n], ttl_s, seq.cache_salt)
        if ttl_s is None:
            raise ValueError(f"{seq.seq_id}: a breakpoint pin needs a TTL")
        return self.pins.pin_breakpoint(program, table[:n], keys[:n], ttl_s, seq.cache_salt,
                                        soft)

    def free(self, seq_id: str) -> None:
        """Release a sequence's blocks (tail first into the LRU) and forget its keys.

        While loads into its blocks are in flight the blocks stay held; they are released
        when the loads complete (``collect_loaded``).
        """
        if self.tiers is not None and self.tiers.is_loading(seq_id):
            self._orphans.add(seq_id)
            return
        table = self._blocks.pop(seq_id, [])
        self._keys.pop(seq_id, None)
        self._num_registered.pop(seq_id, None)
        self._cache_limit.pop(seq_id, None)
        self.pool.free(table[::-1])

    def reset_cache(self) -> bool:
        """Forget every cached prefix (the device KV is gone, and with it the host tier and
        every transfer); only when no block is in use apart from abandoned loads."""
        if self.tiers is not None:
            self.tiers.reset()
        if self.pins is not None:
            self.pins.clear()
        for seq_id in list(self._orphans):
            self._orphans.discard(seq_id)
            self.free(seq_id)
        for holder in list(self._held):
            self.release(holder)
        for blocks, _ in self._prefetch.values():
            self.pool.free(blocks)
        self._prefetch.clear()
        return self.pool.reset_cache()

    # ------------------------------------------------------------------ chunks
    def cached_run(self, keys: Sequence[bytes]) -> list[int]:
        """Device blocks of the leading run of ``keys`` that are cached (no references)."""
        if not self.enable_prefix_caching:
            return []
        out: list[int] = []
        for key in keys:
            b = self.pool.get_cached_block(key)
            if b is None:
                break
            out.append(b)
        return out

    def has_room(self, need: int, hits: Sequence[int],
                 admission: Admission | None = None) -> bool:
        """Whether ``need`` new blocks fit besides the cached ``hits`` (see ``_has_room``)."""
        return self._has_room(need, list(dict.fromkeys(hits)), admission)

    def hold(self, holder: str, blocks: Sequence[int]) -> None:
        """Reference cached ``blocks`` for ``holder`` (e.g. chunk blocks a blend reads) until
        ``release``; they cannot be evicted meanwhile."""
        self.pool.touch(blocks)
        self._held.setdefault(holder, []).extend(blocks)

    def store_chunk(self, holder: str, keys: Sequence[bytes]) -> list[int]:
        """Allocate blocks for a chunk's ``keys`` (to be computed this step), register them in
        the cache and hold them for ``holder``. The caller checked the room (``has_room``)."""
        new = self.pool.allocate(len(keys))
        assert new is not None, "store_chunk without room"
        self._cache_computed(new, keys)
        self._held.setdefault(holder, []).extend(new)
        return new

    def release(self, holder: str) -> None:
        """Drop the references ``hold`` and ``store_chunk`` took for ``holder``."""
        self.pool.free(self._held.pop(holder, [])[::-1])

    def prefetch(self, loader: str, keys: Sequence[bytes], tiers: Sequence[str],
                 keep: Sequence[int] = ()) -> bool:
        """Load blocks ``keys`` from the lower ``tiers`` into new device blocks, registered
        under their keys once loaded (``collect_loaded`` reports ``loader`` then). Used for
        chunk blocks; ``keep`` are cached blocks the allocation must not evict. False (nothing
        changed) if there is no room."""
        assert self.tiers is not None and loader not in self._prefetch
        if not self._has_room(len(keys), list(dict.fromkeys(keep))):
            return False
        slots = self.tiers.pin_loads(keys, tiers)
        self.pool.touch(keep)
        new = self.pool.allocate(len(keys))
        self.pool.free(keep)
        assert new is not None
        self._prefetch[loader] = (new, list(keys))
        self.tiers.start_loads(loader, keys, tiers, slots, new)
        return True

    def is_prefetching(self, loader: str) -> bool:
        return loader in self._prefetch

    def limit_caching(self, seq_id: str, num_blocks: int) -> None:
        """Never register blocks of ``seq_id`` past the first ``num_blocks`` in the prefix
        cache (a blended prompt's KV is approximate from its first chunk on)."""
        self._cache_limit[seq_id] = num_blocks

    # ------------------------------------------------------------------ tier loads
    def plan_tier_loads(self, seq: KVSeq, num_device_hits: int,
                        busy: bool = True) -> list[str]:
        """Tiers to load the blocks after the device hit from ("host"/"disk" each, in order),
        as far as the load policy finds loading faster than recomputing. [] = none."""
        if self.tiers is None:
            return []
        max_blocks = (len(seq.all_token_ids) - 1) // self.block_size
        keys = self._seq_keys(seq, max_blocks)[num_device_hits:max_blocks]
        return self.tiers.plan_loads(keys, busy) if keys else []

    def probe_keys(self, seq: KVSeq, num_device_hits: int) -> list[bytes]:
        """The keys after the device hit that neither host nor disk holds (from the first
        such key on): what only the remote store might have."""
        if self.tiers is None:
            return []
        max_blocks = (len(seq.all_token_ids) - 1) // self.block_size
        keys = self._seq_keys(seq, max_blocks)[num_device_hits:max_blocks]
        local = [self.tiers.tiers[n] for n in ("host", "disk") if n in self.tiers.tiers]
        i = 0
        while i < len(keys) and any(t.lookup([keys[i]]) for t in local):
            i += 1
        return keys[i:]

    def start_loads(self, seq: KVSeq, device_hits: Sequence[int], tiers: Sequence[str],
                    admission: Admission | None = None) -> int | None:
        """Reference the device hits, allocate a block per tier hit and emit its load.

        The sequence's table becomes ``device_hits + load blocks``. Staged loads (any disk
        block) register the load blocks in the prefix cache once loaded
        (``collect_loaded``); inline loads (host only, ``TieredCache.loads_inline``) count as
        computed at once: the step that copies them may compute the rest of the prompt.
        Returns the tokens computed now (with inline loads, the loaded ones too); None
        (nothing changed) if no room.
        """
        assert self.tiers is not None and seq.seq_id not in self._blocks
        if not self._has_room(len(tiers), device_hits, admission):
            return None
        keys = self._keys[seq.seq_id][len(device_hits):len(device_hits) + len(tiers)]
        slots = self.tiers.pin_loads(keys, tiers)
        self.pool.touch(device_hits)
        new = self.pool.allocate(len(tiers))
        assert new is not None
        self._blocks[seq.seq_id] = [*device_hits, *new]
        inline = self.tiers.loads_inline(tiers)
        self.tiers.start_loads(seq.seq_id, keys, tiers, slots, new, inline)
        self._num_registered[seq.seq_id] = len(device_hits)
        self._record_lookup(seq, len(device_hits) * self.block_size)
        if inline:
            return self._loaded(seq.seq_id, len(tiers), tiers)
        return len(device_hits) * self.block_size

    def collect_loaded(self) -> list[tuple[str, int]]:
        """Sequences whose loads completed: (seq id, tokens now computed = device hit plus the
        blocks loaded before the first failure). Loaded blocks join the prefix cache;
        sequences freed meanwhile release their blocks now."""
        if self.tiers is None:
            return []
        out = []
        for seq_id, good, tiers in self.tiers.loads_done():
            if seq_id in self._prefetch:  # chunk blocks: cached (unreferenced) from now on
                blocks, keys = self._prefetch.pop(seq_id)
                self.pool.cache_full_blocks(blocks[:good], keys[:good])
                self.pool.free(blocks[::-1])
                self.tiers.count_hits(tiers, self.block_size)
                out.append((seq_id, good * self.block_size))
                continue
            if seq_id in self._orphans:
                self._orphans.discard(seq_id)
                self.free(seq_id)
                continue
            out.append((seq_id, self._loaded(seq_id, good, tiers)))
        return out

    def _loaded(self, seq_id: str, good: int, tiers: Sequence[str]) -> int:
        """``good`` blocks after the registered ones hold loaded KV: cache them; returns the
        sequence's computed tokens."""
        assert self.tiers is not None
        done = self._num_registered[seq_id]
        table, keys = self._blocks[seq_id], self._keys[seq_id]
        self.pool.cache_full_blocks(table[done:done + good], keys[done:done + good])
        self._num_registered[seq_id] = done + good
        self.tiers.count_hits(tiers, self.block_size)
        self.prefix_hits += good * self.block_size
        return (done + good) * self.block_size

    def _seq_keys(self, seq: KVSeq, num_blocks: int) -> list[bytes]:
        known = self._keys.get(seq.seq_id, [])
        if len(known) >= num_blocks:
            return known
        keys = self.hasher.prefix_keys(
            seq.all_token_ids, self.block_size, seq.cache_salt, known, num_blocks
        )
        self._keys[seq.seq_id] = keys
        return keys

    def register_known(self, seq: KVSeq) -> None:
        """Register the full blocks of ``seq``'s computed tokens whose ids have just become
        known (asynchronous scheduling computes a position before its sampled token comes
        back; a block is keyed by its tokens)."""
        if seq.seq_id in self._blocks:
            self._register_full_blocks(seq, seq.num_computed_tokens)

    def _register_full_blocks(self, seq: KVSeq, num_tokens: int) -> None:
        """Cache the blocks full by ``num_tokens`` whose tokens are all known."""
        if not self.enable_prefix_caching:
            return
        done = self._num_registered.get(seq.seq_id, 0)
        known = min(num_tokens, len(seq.all_token_ids))
        full = min(known // self.block_size, self._cache_limit.get(seq.seq_id, 1 << 62))
        if full <= done:
            return
        keys = self._seq_keys(seq, full)
        persist = getattr(seq, "persist_kv", False)
        self._cache_computed(self._blocks[seq.seq_id][done:full], keys[done:full], persist)
        self._num_registered[seq.seq_id] = full

    def _cache_computed(self, blocks: Sequence[int], keys: Sequence[bytes],
                        persist: bool = False) -> None:
        """Register blocks being computed this step under their keys; the tiers learn of the
        ones that took their key (write-through, checkpoints, ``persist``: saved at once)."""
        self.pool.cache_full_blocks(blocks, keys)
        if self.tiers is not None:
            for b, key in zip(blocks, keys, strict=True):
                if self.pool.key_of(b) == key:
                    self.tiers.on_computed(key, b, persist)

    def persist_prefix(self, seq: KVSeq, num_tokens: int) -> None:
        """Give the cached full blocks of ``seq``'s first ``num_tokens`` their durable copies
        (disk, remote) in the next step (a pin that outlives the checkpoint interval)."""
        if self.tiers is None:
            return
        table, keys = self._blocks.get(seq.seq_id, []), self._keys.get(seq.seq_id, [])
        for b, key in list(zip(table, keys, strict=False))[: num_tokens // self.block_size]:
            if self.pool.key_of(b) == key:
                self.tiers.persist(key, b)

    def _record_lookup(self, seq: KVSeq, num_hit_tokens: int) -> None:
        if self.enable_prefix_caching:
            self.prefix_queries += len(seq.all_token_ids)
            self.prefix_hits += num_hit_tokens
            self.device_hits += num_hit_tokens
        if self.tiers is not None and num_hit_tokens:
            # a hot prefix keeps its lower-tier copies too (no re-store when the device evicts)
            self.tiers.touch(self._keys[seq.seq_id][: num_hit_tokens // self.block_size])

    # ------------------------------------------------------------------ invariants
    def check_integrity(self) -> None:
        """Pool invariants, plus: every block's ref count equals the tables that hold it; the
        tier indexes agree with the transfers in flight."""
        self.pool.check_integrity()
        if self.tiers is not None:
            self.tiers.check_integrity()
        if self.pins is not None:
            self.pins.check_integrity()
        if not self._orphans <= set(self._blocks):
            raise AssertionError("an orphaned load holds no blocks")
        holders = [0] * self.pool.num_blocks
        for seq_id, table in self._blocks.items():
            if not table:
                raise AssertionError(f"{seq_id} has an empty block table entry")
            for b in table:
                holders[b] += 1
        for pinned in self.pins.holders() if self.pins is not None else []:
            for b in pinned:
                holders[b] += 1
        for held in [*self._held.values(), *(b for b, _ in self._prefetch.values())]:
            for b in held:
                holders[b] += 1
        for b in range(1, self.pool.num_blocks):
            if holders[b] != self.pool.ref_count(b):
                raise AssertionError(
                    f"block {b}: ref_cnt {self.pool.ref_count(b)} but held by {holders[b]} "
                    "seqs and pins"
                )

"""Blended admission of prompts with position-independent chunks (CacheBlend), the P1 side.

A waiting sequence whose prompt has chunk spans after its prefix hit is admitted in one step:

    prompt       | prefix hit | text | chunk A | text | chunk B | question |
    its blocks   | shared     | its own blocks, never registered from chunk A's block on |
    chunk store  A: standalone blocks (cached, or computed this step by a store-only seq)
                 B: ...

The step carries the sequence's whole remaining prompt with a ``BlendPlan`` and, for each
chunk not fully cached, a ``store_only`` sequence that computes the chunk standalone into
newly registered chunk blocks. The worker runs the ordinary batch (store-only sequences
included) first and the blends after, so a chunk stored this step is blended this step. Chunk
blocks stay referenced until the next ``begin_step`` (the step has run by then).

Keys, metadata and the recompute policy live in ``kvmanager/chunks.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from encore.kvmanager.chunks import chunk_block_keys
from encore.kvmanager.manager import KVCacheManager
from encore.kvmanager.wiring import ChunkStore
from encore.protocol.messages import BlendChunk, BlendPlan, ScheduledSeq
from encore.scheduler.request import Seq


@dataclass
class _Chunk:
    """One chunk of a request: where it goes and what the store holds of it."""

    root: bytes
    start: int
    end: int
    keys: list[bytes]
    hits: list[int]  # cached leading blocks
    preceding: frozenset[bytes]  # roots of the chunks before it in this request
    recompute: int = 0
    blocks: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def cached(self) -> bool:
        return len(self.hits) == len(self.keys)


@dataclass
class BlendAdmission:
    """A planned blend: chunk lookups done, nothing allocated yet."""

    chunks: list[_Chunk]
    first_start: int  # position of the first chunk (no prefix caching from its block on)
    block_size: int

    def unique(self) -> list[_Chunk]:
        """One entry per distinct chunk (a chunk may appear twice in a prompt)."""
        return list({c.root: c for c in self.chunks}.values())

    @property
    def reused(self) -> int:
        """Chunk tokens taken from the store and not recomputed."""
        return sum(c.length - c.recompute for c in self.chunks if c.cached)

    def new_chunk_blocks(self) -> int:
        return sum(len(c.keys) - len(c.hits) for c in self.unique())

    def hit_blocks(self) -> list[int]:
        return [b for c in self.unique() for b in c.hits]

    def cost(self, num_new_tokens: int) -> int:
        """Tokens of compute this step: the prompt minus what blending skips, plus chunks to
        store."""
        bs = self.block_size
        stores = sum(c.length - len(c.hits) * bs for c in self.unique() if not c.cached)
        skipped = sum(c.length - c.recompute for c in self.chunks)
        return num_new_tokens - skipped + stores


class Blender:
    """Chunk lookups, the recompute policy, chunk metadata and the chunk counters."""

    def __init__(self, kv: KVCacheManager, store: ChunkStore) -> None:
        self.kv = kv
        self.block_size = kv.block_size
        self.check_layer = store.check_layer
        self.policy = store.policy
        self.meta = store.meta
        self.queries = self.hit_tokens = self.recomputed_tokens = 0  # cumulative
        self._holders: list[str] = []  # released at the next begin_step
        self._measuring: dict[str, list[_Chunk]] = {}  # seq id -> its chunks, until measured
        self._prefetched: set[str] = set()  # sequences whose chunks were loaded from a tier
        # a waiting sequence's chunk keys, by span: (root, block keys); kept until it ends
        self._keys: dict[str, dict[tuple[int, int], tuple[bytes, list[bytes]]]] = {}

    def applies(self, seq: Seq) -> bool:
        """Blending needs the chunk store (prefix caching) and no prompt logprobs."""
        return (bool(seq.chunks) and self.kv.enable_prefix_caching
                and seq.sampling.prompt_logprobs is None)

    def begin_step(self) -> None:
        """The previous step ran: its blends no longer need their chunk blocks."""
        for holder in self._holders:
            self.kv.release(holder)
        self._holders.clear()
        self._measuring.clear()

    def reset(self) -> None:
        """The worker died: holds and chunk loads went with ``kv.reset_cache``."""
        self._holders.clear()
        self._measuring.clear()
        self._prefetched.clear()
        self._keys.clear()

    # ------------------------------------------------------------------ admission
    def prepare(self, seq: Seq, hit_tokens: int) -> BlendAdmission | None:
        """Look up the chunks after the prefix hit and pick their recompute counts; None when
        no chunk is left to blend."""
        chunks: list[_Chunk] = []
        for start, end in seq.chunks:
            if start < hit_tokens or end <= start or end > seq.num_prompt_tokens:
                continue
            root, keys = self._chunk_keys(seq, start, end)
            preceding = frozenset(c.root for c in chunks)
            chunks.append(_Chunk(root, start, end, keys, self.kv.cached_run(keys), preceding))
        if not chunks:
            return None
        for c in chunks:
            fraction = seq.chunk_recompute
            if fraction is None:
                fraction = self.policy.fraction(self.meta.get(c.root), c.preceding, c.start,
                                                self.meta.mean_impact)
            c.recompute = min(c.length, math.ceil(fraction * c.length))
        return BlendAdmission(chunks, chunks[0].start, self.block_size)

    def _chunk_keys(self, seq: Seq, start: int, end: int) -> tuple[bytes, list[bytes]]:
        """The chunk key and block keys of ``seq``'s span [start, end), hashed once per
        sequence (a sequence waiting for room is prepared again every step)."""
        known = self._keys.setdefault(seq.seq_id, {})
        if (start, end) not in known:
            span = seq.all_token_ids[start:end]
            root = self.kv.hasher.chunk_key(seq.cache_salt, span)
            known[(start, end)] = root, chunk_block_keys(self.kv.hasher, root, span,
                                                         self.block_size)
        return known[(start, end)]

    def start_prefetch(self, seq: Seq, adm: BlendAdmission) -> bool | None:
        """Load the chunks that are not on the device but whole in the host/disk tiers (as far
        as the load policy finds loading faster than recomputing), once per sequence. None:
        nothing to load; True: loads started (the sequence waits for them, then is admitted
        again); False: no room now."""
        tiers = self.kv.tiers
        if tiers is None or seq.seq_id in self._prefetched:
            return None
        keys: list[bytes] = []
        sources: list[str] = []
        for c in adm.unique():
            rest = c.keys[len(c.hits):]
            if not rest:
                continue
            plan = tiers.plan_loads(rest)
            if len(plan) == len(rest):  # a chunk half loaded would be recomputed anyway
                keys += rest
                sources += plan
        if not keys:
            return None
        if not self.kv.prefetch(self.loader_id(seq.seq_id), keys, sources, adm.hit_blocks()):
            return False
        self._prefetched.add(seq.seq_id)
        return True

    @staticmethod
    def loader_id(seq_id: str) -> str:
        return f"{seq_id}/chunk-load"

    @staticmethod
    def loaded_seq(loader: str) -> str | None:
        """The sequence a finished chunk load served (None: not a chunk load)."""
        return loader.removesuffix("/chunk-load") if loader.endswith("/chunk-load") else None

    def forget(self, seq_id: str) -> None:
        """``seq_id`` ended."""
        self._prefetched.discard(seq_id)
        self._keys.pop(seq_id, None)

    def hold_hits(self, seq: Seq, adm: BlendAdmission) -> None:
        """Reference the cached chunk blocks before anything else allocates (an allocation
        could otherwise evict them)."""
        holder = f"{seq.seq_id}/blend"
        self._holders.append(holder)
        for c in adm.unique():
            self.kv.hold(holder, c.hits)

    def store(self, seq: Seq, adm: BlendAdmission) -> tuple[BlendPlan, list[ScheduledSeq]]:
        """Allocate the chunks not fully cached (store-only sequences compute them this step)
        and build the plan. Call after the sequence's own blocks are allocated."""
        holder = f"{seq.seq_id}/blend"
        stores: list[ScheduledSeq] = []
        for i, c in enumerate(adm.unique()):
            new = self.kv.store_chunk(holder, c.keys[len(c.hits):]) if not c.cached else []
            c.blocks = [*c.hits, *new]
            if new:
                done = len(c.hits) * self.block_size
                span = seq.all_token_ids[c.start + done:c.end]
                stores.append(ScheduledSeq(seq_id=f"{seq.seq_id}/chunk{i}", token_ids=list(span),
                                           start_pos=done, block_table=c.blocks, sample=False,
                                           store_only=True))
        blocks = {c.root: c.blocks for c in adm.unique()}
        for c in adm.chunks:
            self.queries += 1
            if c.cached:
                self.hit_tokens += c.length
                self.recomputed_tokens += c.recompute
        self._measuring[seq.seq_id] = adm.chunks
        plan = BlendPlan([BlendChunk(c.start, c.length, blocks[c.root], c.recompute)
                          for c in adm.chunks], self.check_layer)
        return plan, stores

    # ------------------------------------------------------------------ results
    def observe(self, deviations: dict[str, list[float]]) -> None:
        """Record each chunk's measured context impact (first measurement kept)."""
        for seq_id, values in deviations.items():
            chunks = self._measuring.pop(seq_id, [])
            for c, impact in zip(chunks, values, strict=False):
                self.meta.record(c.root, impact, c.preceding)

"""Position-independent chunks (CacheBlend / Cache-Craft): keys, metadata, recompute policy.

A chunk (a RAG document, marked by the client or found by the server) is tokenized on its own,
so its tokens are the same wherever it appears. Its KV is computed *standalone* (positions
``0 .. L-1``, no context) and kept in the device pool like prefix blocks, under keys chained
from the position-free chunk key:

    root    = chunk_key(salt, tokens)                          (tenant salt inside)
    block i = block_key(block i-1, tokens of block i, extra = root if i == 0 else "")

The last block may be partial: its key hashes fewer tokens, so it never equals a full block's
key, and prefix lookups never compute partial keys. Stored chunk blocks are ordinary cached
blocks: LRU-evicted, written back to the host/disk tiers like any keyed block.

Reusing a chunk at position ``p`` re-rotates its keys by ``p`` and recomputes a fraction of
its tokens (the worker picks those whose K/V deviate most at the check layer). The fraction
comes from a ``RecomputePolicy``:

- ``fixed``: the configured fraction (CacheBlend's 15% by default).
- ``adaptive`` (Cache-Craft's idea, on standalone KV): each chunk's *context impact* is
  measured the first time it is blended in context (the request that stored it) as the mean
  relative K/V deviation at the check layer between its standalone and its in-context values,
  together with the chunks that preceded it then. A chunk placed first (nothing before it)
  needs nothing recomputed; one whose impact is far above the average is recomputed in full;
  otherwise the fraction scales with impact relative to the average, and is trusted below the
  fixed fraction only as far as its original context (the chunks measured before it) is
  present again.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from encore.kvmanager.hashing import BlockHasher

ADAPTIVE_MIN = 0.02  # the adaptive policy never goes below this unless the chunk comes first
ADAPTIVE_MAX = 0.6  # ... nor above this, short of a full recompute
FULL_RECOMPUTE_IMPACT = 3.0  # impact this many times the average: recompute the chunk in full
MAX_META = 65536  # chunks whose metadata is remembered (least recently used dropped)


def chunk_block_keys(hasher: BlockHasher, root: bytes, tokens: Sequence[int],
                     block_size: int) -> list[bytes]:
    """Keys of the blocks of a chunk whose chunk key is ``root`` (``hasher.chunk_key(salt,
    tokens)``, its metadata key too); the last block may be partial (module docstring)."""
    keys: list[bytes] = []
    for i in range(0, len(tokens), block_size):
        parent = keys[-1] if keys else None
        keys.append(hasher.block_key(parent, tokens[i:i + block_size], root if i == 0 else b""))
    return keys


@dataclass
class ChunkMeta:
    """What was measured about a chunk when it was first blended in context."""

    impact: float  # mean relative K/V deviation at the check layer (Cache-Craft's CCI)
    context: frozenset[bytes]  # roots of the chunks that preceded it then


class RecomputePolicy(abc.ABC):
    """Decides what fraction of a reused chunk's tokens to recompute."""

    def __init__(self, fraction: float) -> None:
        self.base = fraction

    @abc.abstractmethod
    def fraction(self, meta: ChunkMeta | None, preceding: frozenset[bytes], start: int,
                 mean_impact: float | None) -> float:
        """``start``: the chunk's position in the request; ``preceding``: roots of the chunks
        before it; ``mean_impact``: the average measured impact over known chunks."""


class FixedPolicy(RecomputePolicy):
    def fraction(self, meta: ChunkMeta | None, preceding: frozenset[bytes], start: int,
                 mean_impact: float | None) -> float:
        return self.base


class AdaptivePolicy(RecomputePolicy):
    def fraction(self, meta: ChunkMeta | None, preceding: frozenset[bytes], start: int,
                 mean_impact: float | None) -> float:
        if start == 0:
            return 0.0  # nothing precedes it: the standalone KV is the in-context KV
        if meta is None or not mean_impact:
            return self.base  # not measured yet: the fixed fraction (and measure it)
        ratio = meta.impact / mean_impact
        if ratio >= FULL_RECOMPUTE_IMPACT:
            return 1.0
        scaled = min(max(self.base * ratio, ADAPTIVE_MIN), ADAPTIVE_MAX)
        if scaled >= self.base or not meta.context:
            return scaled
        present = len(meta.context & preceding) / len(meta.context)
        return present * scaled + (1.0 - present) * self.base


def make_policy(name: str, fraction: float) -> RecomputePolicy:
    policies = {"fixed": FixedPolicy, "adaptive": AdaptivePolicy}
    if name not in policies:
        raise ValueError(f"chunk_recompute_policy={name!r}: choose 'fixed' or 'adaptive'")
    return policies[name](fraction)


class ChunkMetaTable:
    """Measured chunk metadata (bounded, least recently used dropped) and its running mean."""

    def __init__(self, capacity: int = MAX_META) -> None:
        self.capacity = capacity
        self._meta: OrderedDict[bytes, ChunkMeta] = OrderedDict()
        self._impact_sum = 0.0

    def __len__(self) -> int:
        return len(self._meta)

    def get(self, root: bytes) -> ChunkMeta | None:
        meta = self._meta.get(root)
        if meta is not None:
            self._meta.move_to_end(root)
        return meta

    @property
    def mean_impact(self) -> float | None:
        return self._impact_sum / len(self._meta) if self._meta else None

    def record(self, root: bytes, impact: float, context: frozenset[bytes]) -> None:
        """Keep the first measurement of a chunk (the one taken when it was stored)."""
        if root in self._meta:
            return
        self._meta[root] = ChunkMeta(impact, context)
        self._impact_sum += impact
        while len(self._meta) > self.capacity:
            _, old = self._meta.popitem(last=False)
            self._impact_sum -= old.impact

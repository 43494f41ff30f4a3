"""The KV bookkeeping, built and connected in one place (``build_kv``).

    TieredCache ◄──on_evict── BlockPool ◄──references── PinTable
       (host/disk      │                                   │  on_demote, miss_cost ──► TieredCache
        indexes)       ▼
                 KVCacheManager(pool, hasher, tiers, pins)        ChunkStore(meta, policy)

Every collaborator is passed in at construction; nothing is attached afterwards. Prefix
caching off means no tiers, no pins and no chunk reuse (they all hold prefix-cached blocks).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from encore.configs.types import CacheConfig
from encore.kvmanager.block_pool import BlockPool
from encore.kvmanager.chunks import ChunkMetaTable, RecomputePolicy, make_policy
from encore.kvmanager.hashing import DEV_SECRET, BlockHasher
from encore.kvmanager.manager import KVCacheManager
from encore.kvmanager.pins import PinTable, TTLPolicy
from encore.kvmanager.tiered import TieredCache, TierSetup


@dataclass(frozen=True)
class ChunkStore:
    """What chunk reuse keeps beside the blocks: measured chunk metadata and the policy that
    turns it into a recompute fraction; ``check_layer`` is where the worker scores tokens."""

    meta: ChunkMetaTable
    policy: RecomputePolicy
    check_layer: int


@dataclass(frozen=True)
class KVParts:
    """The connected KV bookkeeping of one engine."""

    kv: KVCacheManager
    chunks: ChunkStore

    @property
    def pins(self) -> PinTable | None:
        return self.kv.pins

    @property
    def tiers(self) -> TieredCache | None:
        return self.kv.tiers


def build_kv(cache: CacheConfig, num_device_blocks: int, *, secret: bytes = DEV_SECRET,
             tiers: TierSetup | None = None,
             clock: Callable[[], float] = time.monotonic) -> KVParts:
    """The KV manager with its pool, tiers (``tiers``: sizes from the worker) and pin table,
    and the chunk store. ``clock`` drives every TTL and transfer timing."""
    caching = cache.enable_prefix_caching
    tiered = None
    if caching and tiers is not None and (tiers.num_host_blocks or tiers.num_disk_blocks
                                          or tiers.remote):
        tiered = TieredCache(tiers, cache.block_size, clock)
    on_evict = tiered.on_device_evict if tiered is not None else None
    pool = BlockPool(num_device_blocks, enable_caching=caching, on_evict=on_evict)
    pins = None
    if caching and cache.enable_ttl_pins:
        pins = _pin_table(cache, pool, tiered, clock, tiers.block_bytes if tiers else 0)
    kv = KVCacheManager(pool, cache.block_size, BlockHasher(secret, cache.hash_algorithm),
                        tiers=tiered, pins=pins)
    policy = make_policy(cache.chunk_recompute_policy, cache.chunk_recompute_fraction)
    return KVParts(kv, ChunkStore(ChunkMetaTable(), policy, cache.chunk_check_layer))


def _pin_table(cache: CacheConfig, pool: BlockPool, tiered: TieredCache | None,
               clock: Callable[[], float], block_bytes: int) -> PinTable:
    """Pins hold at most ``max_pinned_fraction`` of the usable blocks; with a lower tier a
    released pin is demoted to it and priced at its reload (``miss_cost``)."""
    cap = int(cache.max_pinned_fraction * pool.num_usable)
    policy = TTLPolicy(cache.max_pin_ttl_s, cache.block_size)
    quota = _tenant_quota_blocks(cache, block_bytes)
    if tiered is None:
        return PinTable(pool, policy, cap, clock, max_tenant_blocks=quota)
    return PinTable(pool, policy, cap, clock, on_demote=tiered.on_device_evict,
                    max_tenant_blocks=quota, miss_cost=tiered.miss_cost)


def _tenant_quota_blocks(cache: CacheConfig, block_bytes: int) -> int | None:
    """``max_pinned_gib_per_tenant`` in whole blocks (None = no quota)."""
    if cache.max_pinned_gib_per_tenant <= 0:
        return None
    if block_bytes <= 0:
        raise ValueError("cache.max_pinned_gib_per_tenant needs the KV block size in bytes "
                         "(the engine passes it from the worker)")
    return int(cache.max_pinned_gib_per_tenant * 2**30) // block_bytes

"""KV bookkeeping (torch-free): hashing, the block pool and the per-sequence KV manager."""

from encore.kvmanager.block_pool import NULL_BLOCK, BlockPool
from encore.kvmanager.hashing import DEV_SECRET, BlockHasher, HashAlgorithm, pack_tokens, salt_extra
from encore.kvmanager.manager import KVCacheManager, KVSeq

__all__ = [
    "DEV_SECRET",
    "NULL_BLOCK",
    "BlockHasher",
    "BlockPool",
    "HashAlgorithm",
    "KVCacheManager",
    "KVSeq",
    "pack_tokens",
    "salt_extra",
]

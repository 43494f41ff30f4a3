"""Block pool: null block, ref counts, LRU eviction order, key map, integrity checks."""

from __future__ import annotations

import pytest

from encore.kvmanager.block_pool import BlockPool


def key(i: int) -> bytes:
    return i.to_bytes(32, "little")


def assert_idle(pool: BlockPool) -> None:
    pool.check_integrity()
    assert pool.num_free == pool.num_usable
    assert pool.usage == 0.0


def test_block_zero_is_reserved() -> None:
    pool = BlockPool(5)
    assert pool.allocate(4) == [1, 2, 3, 4]
    assert pool.allocate(1) is None
    assert pool.usage == 1.0
    pool.free([4, 3, 2, 1])
    assert_idle(pool)
    with pytest.raises(AssertionError, match="null block"):
        pool.touch([0])
    with pytest.raises(ValueError, match="need >= 2"):
        BlockPool(1)


def test_no_room_changes_nothing() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    assert pool.allocate(2) is None
    assert pool.num_free == 1
    pool.free(a)
    assert_idle(pool)


def test_lru_eviction_order_tail_blocks_first() -> None:
    pool = BlockPool(8)
    seq_a = pool.allocate(3)  # [1, 2, 3]
    seq_b = pool.allocate(2)  # [4, 5]
    assert (seq_a, seq_b) == ([1, 2, 3], [4, 5])
    pool.cache_full_blocks(seq_a, [key(1), key(2), key(3)])
    pool.cache_full_blocks(seq_b, [key(4), key(5)])
    pool.free(seq_a[::-1])  # a sequence frees tail first
    pool.free(seq_b[::-1])
    # head: never-used 6, 7; then a's tail..head, then b's tail..head
    assert pool.free_queue_order() == [6, 7, 3, 2, 1, 5, 4]
    assert pool.allocate(4) == [6, 7, 3, 2]
    assert pool.get_cached_block(key(3)) is None  # evicted: key dropped
    assert pool.get_cached_block(key(2)) is None
    assert pool.get_cached_block(key(1)) == 1
    assert pool.evictions == 2
    pool.free([2, 3, 7, 6])
    assert_idle(pool)


def test_uncached_blocks_are_reused_before_cached_ones() -> None:
    pool = BlockPool(5)
    a = pool.allocate(2)  # [1, 2]
    b = pool.allocate(2)  # [3, 4]
    pool.cache_full_blocks(a, [key(1), key(2)])
    pool.free(a[::-1])
    pool.free(b[::-1])  # uncached: straight to the head
    assert pool.free_queue_order() == [3, 4, 2, 1]
    assert pool.allocate(2) == [3, 4]
    assert pool.num_cached == 2
    pool.free([3, 4])
    assert_idle(pool)


def test_touch_shares_a_cached_block() -> None:
    pool = BlockPool(4)
    [b] = pool.allocate(1)
    pool.cache_full_blocks([b], [key(9)])
    assert pool.get_cached_block(key(9)) == b
    pool.touch([b])
    assert pool.ref_count(b) == 2
    pool.free([b])
    pool.free([b])
    assert pool.get_cached_block(key(9)) == b  # still cached while unreferenced
    pool.touch([b])  # a later hit pulls it off the free queue
    assert b not in pool.free_queue_order() and pool.ref_count(b) == 1
    pool.free([b])
    assert_idle(pool)


def test_duplicate_content_keeps_the_first_block() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache_full_blocks([a], [key(1)])
    pool.cache_full_blocks([b], [key(1)])
    assert pool.get_cached_block(key(1)) == a
    assert pool.key_of(b) is None
    pool.cache_full_blocks([a], [key(1)])  # idempotent
    with pytest.raises(AssertionError, match="different key"):
        pool.cache_full_blocks([a], [key(2)])
    pool.free([a, b])
    assert_idle(pool)


def test_caching_disabled_never_registers() -> None:
    pool = BlockPool(4, enable_caching=False)
    a = pool.allocate(1)
    pool.cache_full_blocks(a, [key(1)])
    assert pool.get_cached_block(key(1)) is None
    pool.free(a)
    assert_idle(pool)


def test_double_free_is_caught() -> None:
    pool = BlockPool(4)
    a = pool.allocate(1)
    pool.free(a)
    with pytest.raises(AssertionError, match="double free"):
        pool.free(a)
    assert_idle(pool)


def test_check_integrity_detects_corruption() -> None:
    pool = BlockPool(4)
    a = pool.allocate(1)
    pool._ref[a[0]] = 0  # a block referenced by nobody but not queued
    with pytest.raises(AssertionError, match="free queue"):
        pool.check_integrity()
    pool._ref[a[0]] = -1
    with pytest.raises(AssertionError, match="negative"):
        pool.check_integrity()


def test_reset_cache_only_when_idle() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.cache_full_blocks(a, [key(1), key(2)])
    assert not pool.reset_cache()
    pool.free(a[::-1])
    assert pool.reset_cache()
    assert pool.num_cached == 0 and pool.get_cached_block(key(1)) is None
    assert_idle(pool)

"""KV manager: prefix lookup, slot allocation, same-step sharing, counters, leak checks."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from encore.configs.types import CacheConfig
from encore.kvmanager.manager import KVCacheManager
from encore.kvmanager.wiring import build_kv

BS = 4


def manager(num_blocks: int, caching: bool = True) -> KVCacheManager:
    """A bare KV manager (no tiers, no pins)."""
    cache = CacheConfig(block_size=BS, enable_prefix_caching=caching, enable_ttl_pins=False)
    return build_kv(cache, num_blocks).kv


@dataclass
class FakeSeq:
    seq_id: str
    all_token_ids: list[int]
    num_computed_tokens: int = 0
    cache_salt: str | None = None
    blocks: list[int] = field(default_factory=list)


def prefill(kv: KVCacheManager, seq: FakeSeq) -> list[int]:
    """Look up, allocate for the rest of the prompt, mark it computed; return its table."""
    hits, n_hit = kv.get_computed_blocks(seq)
    new = kv.allocate_slots(seq, len(seq.all_token_ids) - n_hit, hits)
    assert new is not None
    seq.num_computed_tokens = len(seq.all_token_ids)
    return kv.block_table(seq.seq_id)


def assert_no_leaks(kv: KVCacheManager) -> None:
    kv.check_integrity()
    assert kv.num_free_blocks == kv.num_usable_blocks
    assert kv.usage == 0.0


def test_prefix_hit_after_a_sequence_computed_it() -> None:
    kv = manager(16)
    a = FakeSeq("a", list(range(10)))
    assert prefill(kv, a) == [1, 2, 3]
    b = FakeSeq("b", list(range(8)) + [99, 98, 97])
    assert kv.get_computed_blocks(b) == ([1, 2], 8)
    assert prefill(kv, b) == [1, 2, 4]
    assert (kv.pool.ref_count(1), kv.pool.ref_count(3)) == (2, 1)
    assert (kv.prefix_queries, kv.prefix_hits) == (21, 8)  # tokens, not blocks
    kv.free("a")
    kv.free("b")
    assert_no_leaks(kv)


def test_full_hit_still_leaves_one_token_to_compute() -> None:
    kv = manager(16)
    prefill(kv, FakeSeq("a", list(range(8))))
    again = FakeSeq("b", list(range(8)))
    assert kv.get_computed_blocks(again) == ([1], 4)  # backs off the last full block
    assert prefill(kv, again) == [1, 3]
    kv.free("a")
    kv.free("b")
    assert_no_leaks(kv)


def test_same_step_registration_lets_a_sibling_share() -> None:
    kv = manager(16)
    a = FakeSeq("a", list(range(9)))
    hits, _ = kv.get_computed_blocks(a)
    kv.allocate_slots(a, 9, hits)  # not computed yet: the step is only being planned
    b = FakeSeq("b", list(range(9)))
    assert kv.get_computed_blocks(b) == ([1, 2], 8)


def test_blocks_are_registered_as_chunks_fill_them() -> None:
    kv = manager(16)
    a = FakeSeq("a", list(range(10)))
    assert kv.allocate_slots(a, 3) == [1]
    a.num_computed_tokens = 3
    assert kv.get_computed_blocks(FakeSeq("x", list(range(10))))[1] == 0  # block 1 not full
    assert kv.allocate_slots(a, 3) == [2]
    a.num_computed_tokens = 6
    assert kv.get_computed_blocks(FakeSeq("x", list(range(10)))) == ([1], 4)
    kv.free("a")
    kv.free("x")
    assert_no_leaks(kv)


def test_no_room_allocates_nothing() -> None:
    kv = manager(4)  # 3 usable blocks
    a = FakeSeq("a", list(range(8)))
    prefill(kv, a)
    before = kv.num_free_blocks
    assert kv.allocate_slots(FakeSeq("b", list(range(100, 112))), 12) is None
    assert kv.num_free_blocks == before and kv.block_table("b") == []
    kv.check_integrity()
    kv.free("a")
    assert_no_leaks(kv)


def test_evictable_hits_are_not_counted_as_room() -> None:
    kv = manager(4)  # 3 usable blocks
    prefill(kv, FakeSeq("a", list(range(8))))
    kv.free("a")  # blocks 1, 2 cached but unreferenced, 3 free
    b = FakeSeq("b", list(range(8)) + [50, 51, 52, 53, 54])  # hits 2 blocks, needs 2 more
    hits, n = kv.get_computed_blocks(b)
    assert (hits, n) == ([1, 2], 8)
    assert kv.allocate_slots(b, 5, hits) is None  # only 1 block is free besides the hits
    assert kv.allocate_slots(b, 4, hits) == [3]
    assert kv.block_table("b") == [1, 2, 3]
    kv.free("b")
    assert_no_leaks(kv)


def test_salt_separates_sharing() -> None:
    kv = manager(16)
    prefill(kv, FakeSeq("a", list(range(9)), cache_salt="t1"))
    assert kv.get_computed_blocks(FakeSeq("b", list(range(9)), cache_salt="t2")) == ([], 0)
    assert kv.get_computed_blocks(FakeSeq("c", list(range(9)))) == ([], 0)
    assert kv.get_computed_blocks(FakeSeq("d", list(range(9)), cache_salt="t1"))[1] == 8
    for s in "abcd":
        kv.free(s)
    assert_no_leaks(kv)


def test_disabled_prefix_caching_never_hits_or_counts() -> None:
    kv = manager(16, caching=False)
    prefill(kv, FakeSeq("a", list(range(9))))
    assert kv.get_computed_blocks(FakeSeq("b", list(range(9)))) == ([], 0)
    assert (kv.prefix_queries, kv.prefix_hits) == (0, 0)
    kv.free("a")
    assert_no_leaks(kv)


def test_free_returns_tail_first_and_keeps_prefix_longest() -> None:
    kv = manager(5)
    prefill(kv, FakeSeq("a", list(range(12))))  # blocks 1,2,3 all full and cached
    kv.free("a")
    assert kv.pool.free_queue_order() == [4, 3, 2, 1]
    new = kv.allocate_slots(FakeSeq("z", [7] * 8), 8)  # takes 4 then evicts a's tail block
    assert new == [4, 3]
    assert kv.get_computed_blocks(FakeSeq("y", list(range(12)))) == ([1, 2], 8)
    kv.free("z")
    kv.free("y")
    assert_no_leaks(kv)


def test_integrity_catches_a_table_the_pool_disagrees_with() -> None:
    kv = manager(8)
    prefill(kv, FakeSeq("a", list(range(5))))
    kv._blocks["a"].append(5)  # a block the pool never gave out
    with pytest.raises(AssertionError, match="block 5"):
        kv.check_integrity()

"""The torch attention backend against the kernels' torch twins (kernels/reference.py)."""

from __future__ import annotations

import pytest
import torch

from encore.kernels import reference
from encore.worker.attention.torch_backend import TorchAttentionBackend
from tests.helpers.paged import disjoint_block_tables, make_metadata


def _setup(seqs: list[tuple[int, int]], heads: int, kv_heads: int, block_size: int,
           dtype: torch.dtype):
    torch.manual_seed(0)
    d = 16
    tables = disjoint_block_tables([q + s for q, s in seqs], block_size, first=1)
    nblocks = 1 + sum(len(t) for t in tables) + 2
    cache = torch.randn(2, nblocks, block_size, kv_heads, d).to(dtype)
    meta = make_metadata(seqs, tables, block_size)
    t = sum(q for q, _ in seqs)
    q, k, v = (torch.randn(t, h, d).to(dtype) for h in (heads, kv_heads, kv_heads))
    return cache, meta, q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_decode_batch_matches_reference(dtype, heads, kv_heads):
    seqs = [(1, 0), (1, 7), (1, 33), (1, 16)]  # ragged contexts, one fresh sequence
    cache, meta, q, k, v = _setup(seqs, heads, kv_heads, 8, dtype)
    expected_cache = cache.clone()
    reference.kv_write(expected_cache, k, v, meta.slot_mapping)
    expected = reference.decode_attention(q, expected_cache, meta.block_tables, meta.seq_lens,
                                          0.25)
    got = TorchAttentionBackend().forward(q, k, v, cache, meta, 0.25)
    assert torch.equal(cache, expected_cache)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_prefill_with_prefix_matches_reference(heads, kv_heads):
    seqs = [(5, 0), (3, 9), (1, 4), (12, 16)]  # chunked prefill over cached prefixes
    cache, meta, q, k, v = _setup(seqs, heads, kv_heads, 8, torch.float32)
    expected_cache = cache.clone()
    reference.kv_write(expected_cache, k, v, meta.slot_mapping)
    expected = reference.prefill_attention(q, expected_cache, meta.block_tables,
                                           meta.query_start_loc, meta.seq_lens, 0.25)
    got = TorchAttentionBackend().forward(q, k, v, cache, meta, 0.25)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rows_at_given_positions_match_reference():
    """Blending's kept rows: scattered ascending positions, each seeing keys up to its own."""
    seqs = [(4, 36), (3, 17)]  # (rows, context before them): seq_len = rows + context
    cache, meta, q, k, v = _setup(seqs, 6, 2, 8, torch.float32)
    positions = torch.tensor([2, 9, 30, 39, 0, 11, 19], dtype=torch.int32)
    tables = meta.block_tables
    slots = torch.cat([tables[b, positions[lo:hi].long() // 8] * 8 + positions[lo:hi] % 8
                       for b, (lo, hi) in enumerate([(0, 4), (4, 7)])]).long()
    meta.slot_mapping, meta.q_positions = slots, positions
    expected_cache = cache.clone()
    reference.kv_write(expected_cache, k, v, slots)
    expected = reference.prefill_attention(q, expected_cache, tables, meta.query_start_loc,
                                           meta.seq_lens, 0.25, positions)
    got = TorchAttentionBackend().forward(q, k, v, cache, meta, 0.25)
    assert torch.equal(cache, expected_cache)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_one_sequence_decodes_on_one_thread_and_restores_the_count(monkeypatch):
    """Batch-1 decode attention runs single-threaded on the CPU (a served stream's speed on
    two cores), gives the same values as on the configured threads, and leaves torch's thread
    count as it found it, also when it raises."""
    from encore.worker.attention import torch_backend

    seqs = [(1, 37)]
    cache, meta, q, _, _ = _setup(seqs, 6, 2, 8, torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        real = torch_backend._decode_attention

        def spy(*args):
            seen.append(torch.get_num_threads())
            return real(*args)

        monkeypatch.setattr(torch_backend, "_decode_attention", spy)
        one = torch_backend.decode_attention(q, cache, meta, 0.25)
        assert seen == [1] and torch.get_num_threads() == 2
        monkeypatch.setattr(torch_backend, "_decode_attention", real)
        both = real(q, cache, meta, 0.25, 1.0, 1.0)  # on the two threads
        assert torch.equal(one, both)

        seqs2 = [(1, 37), (1, 20)]  # two sequences keep the configured threads
        cache2, meta2, q2, _, _ = _setup(seqs2, 6, 2, 8, torch.bfloat16)
        monkeypatch.setattr(torch_backend, "_decode_attention", spy)
        torch_backend.decode_attention(q2, cache2, meta2, 0.25)
        assert seen == [1, 2]

        def boom(*args):
            raise RuntimeError("boom")

        monkeypatch.setattr(torch_backend, "_decode_attention", boom)
        with pytest.raises(RuntimeError):
            torch_backend.decode_attention(q, cache, meta, 0.25)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

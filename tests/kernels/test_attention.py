"""Paged decode and prefill/extend attention kernels against their torch twins."""

from __future__ import annotations

import pytest
import torch

from encore.kernels import reference as R
from encore.kernels.decode_attention import decode_attention
from encore.kernels.prefill_attention import prefill_attention
from tests.kernels.conftest import DEVICE, TOL, paged_batch, rel_err

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")


def _decode(seq_lens, group, hk, d, bs, dtype, num_splits=None, **kw):
    kv, tables = paged_batch(seq_lens, bs, hk, d, dtype, **kw)
    q = torch.randn(len(seq_lens), hk * group, d, device=DEVICE).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    ref = R.decode_attention(q, kv, tables, lens, d ** -0.5)
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    decode_attention(q, kv, tables, lens, d ** -0.5, max(seq_lens), num_splits, out=out)
    assert rel_err(out, ref) < TOL[dtype]


def test_prefill_rows_at_given_positions():
    """Blending: rows at scattered ascending positions, each seeing keys up to its own."""
    seq_lens = [70, 45]
    kv, tables = paged_batch(seq_lens, 16, 2, 32, torch.float32)
    pos = [[0, 3, 4, 17, 31, 32, 50, 69], [12, 13, 44]]
    q = torch.randn(11, 2 * 3, 32, device=DEVICE)
    qsl = torch.tensor([0, 8, 11], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    positions = torch.tensor(pos[0] + pos[1], dtype=torch.int32, device=DEVICE)
    ref = R.prefill_attention(q, kv, tables, qsl, lens, 32 ** -0.5, positions)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, kv, tables, qsl, lens, 32 ** -0.5, 8, out=out, q_positions=positions)
    assert rel_err(out, ref) < TOL[torch.float32]


def _prefill(query_lens, prefix_lens, group, hk, d, bs, dtype, **kw):
    seq_lens = [p + n for p, n in zip(prefix_lens, query_lens, strict=True)]
    kv, tables = paged_batch(seq_lens, bs, hk, d, dtype, **kw)
    q = torch.randn(sum(query_lens), hk * group, d, device=DEVICE).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32,
                       device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    ref = R.prefill_attention(q, kv, tables, qsl, lens, d ** -0.5)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, kv, tables, qsl, lens, d ** -0.5, max(query_lens), out=out)
    assert rel_err(out, ref) < TOL[dtype]


# ------------------------------------------------------------------ interpreter-sized
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_decode_gqa_splits(group, num_splits):
    _decode([1, 17, 70], group, 2, 32, 16, torch.float32, num_splits)


@pytest.mark.parametrize("bs,d,dtype", [(32, 64, torch.bfloat16), (64, 16, torch.float16),
                                        (128, 32, torch.float32)])
def test_decode_block_and_head_sizes(bs, d, dtype):
    _decode([5, 130, 40], 2, 1, d, bs, dtype, num_splits=2)


@pytest.mark.parametrize("group", [1, 3, 4])
def test_prefill_ragged_with_prefix(group):
    # prefix 0, prefix not a block multiple, prefix a block multiple, a pure decode row
    _prefill([9, 21, 5, 1], [0, 13, 32, 40], group, 2, 32, 16, torch.float32)


def test_prefill_heavy_first_order_gives_the_same_rows(monkeypatch):
    """Row tiles launched in reverse (``HEAVY_FIRST``): ragged lengths, so some reversed
    tile ids fall past a short sequence's rows."""
    import encore.kernels.prefill_attention as P

    monkeypatch.setattr(P, "HEAVY_FIRST", not P.HEAVY_FIRST)
    _prefill([9, 21, 5, 1], [0, 13, 32, 40], 3, 2, 32, 16, torch.float32)


@pytest.mark.parametrize("bs,d,dtype", [(32, 64, torch.bfloat16), (64, 16, torch.float16)])
def test_prefill_block_and_head_sizes(bs, d, dtype):
    _prefill([40, 3], [0, 37], 2, 1, d, bs, dtype)


def test_prefill_sequence_with_no_new_tokens():
    _prefill([6, 0, 4], [3, 20, 0], 2, 1, 32, 16, torch.float32)


def test_large_pool_int64_offsets():
    """Blocks at the top of a pool of > 2**31 elements: K and V offsets overflow int32."""
    n = 1_050_000  # 2 * n * 16 * 1 * 128 fp16 = 8.6 GB virtual, a few touched pages
    kw = dict(num_blocks=n, high_blocks=True)
    _decode([20, 33], 2, 1, 128, 16, torch.float16, num_splits=2, **kw)
    _prefill([7, 2], [9, 16], 2, 1, 128, 16, torch.float16, **kw)


def test_wrapper_rejects_bad_arguments():
    kv, tables = paged_batch([5], 16, 2, 32, torch.float32)
    lens = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    q = torch.randn(1, 4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        decode_attention(q.half(), kv, tables, lens, 1.0, 5)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode_attention(torch.randn(1, 3, 32, device=DEVICE), kv, tables, lens, 1.0, 5)
    with pytest.raises(ValueError, match="block_tables"):
        decode_attention(q, kv, tables.long(), lens, 1.0, 5)
    with pytest.raises(ValueError, match="last dim"):
        decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), kv, tables, lens, 1, 5)


# ------------------------------------------------------------------ full shapes (GPU)
@gpu
@needs_cuda
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bs", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_full(group, d, bs, dtype):
    _decode([1, 77, 513, 4000, 17000, 1025], group, 4, d, bs, dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bs", [16, 64, 128])
def test_prefill_full(group, d, bs):
    _prefill([1, 300, 1024, 77, 2048], [0, 511, 0, 1500, 4097], group, 4, d, bs,
             torch.bfloat16)


@gpu
@needs_cuda
def test_large_pool_int64_offsets_gpu():
    n = 2_200_000  # 2 * n * 16 * 8 * 64 bf16: 72 GB would not fit; use Hk=1, D=128: 18 GB
    kw = dict(num_blocks=n, high_blocks=True)
    _decode([300, 4000], 4, 1, 128, 16, torch.bfloat16, **kw)
    _prefill([100, 200], [333, 0], 4, 1, 128, 16, torch.bfloat16, **kw)

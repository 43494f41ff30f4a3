"""Paged prefill / extend attention: causal, ragged, over a cached prefix plus the new tokens.

Design: the KV-write kernel runs first, so every key this kernel needs (prefix and new)
is already in the paged cache; the kernel reads K/V only from there. For sequence b with
``q_len`` new tokens and ``seq_len`` tokens in all, the new tokens sit at positions

    start = seq_len - q_len          prefix (any length, 0 allowed, any alignment)
    [0 .................. start)[start ........... seq_len)
                                 new token i sees keys [0, start + i]

With ``q_positions`` (blending, ``worker/blend.py``) the rows of a sequence are any ascending
positions below ``seq_len`` instead of its last ``q_len``; row i sees keys [0, q_positions[i]].

GQA: grid ``(row_tiles, B, Hk)``. The rows of a tile are (token, query head) pairs of the
G query heads sharing KV head h, flattened row = token * G + head, so one K/V tile feeds
all G heads. Each tile first walks the keys every row sees (no causal mask), then the
diagonal band with the mask. fp32 online softmax in log2 units. An fp8 cache is widened to
q's dtype as tiles load, k_scale folded into the softmax scale, v_scale applied to the output
(as in ``decode_attention``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from encore.kernels._common import (
    check,
    check_int,
    check_out,
    check_paged,
    check_same_device,
    dot_precision,
    dot_upcast,
    fp8_max,
    mma,
    next_pow2,
)
from encore.kernels.decode_attention import LOG2E


@triton.jit
def _attend_tile(q, m_i, l_i, acc, kv_head, table, key_lo, key_hi, row_pos, d, d_mask,
                 stride_c2, stride_cb, stride_cs, qk_scale,
                 CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Online-softmax over keys [key_lo, key_hi); CAUSAL masks key > row_pos."""
    n = tl.arange(0, BLOCK_N)
    for start in range(key_lo, key_hi, BLOCK_N):
        pos = start + n
        n_mask = pos < key_hi
        page = tl.load(table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        tok = page * stride_cb + (pos % BLOCK_SIZE) * stride_cs
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(kv_head + tok[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(kv_head + stride_c2 + tok[:, None] + d[None, :], mask=kv_mask,
                    other=0.0).to(q.dtype)
        qk = mma(q, tl.trans(k), UPCAST, PREC) * qk_scale  # [M, N]
        keep = n_mask[None, :]
        if CAUSAL:
            keep = keep & (pos[None, :] <= row_pos[:, None])
        qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST, PREC)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, H, D]
    cache_ptr,  # [2, N, bs, Hk, D]
    tables_ptr,  # [B, max_blocks] int32
    qsl_ptr,  # [B + 1] int32, query_start_loc
    seq_lens_ptr,  # [B] int32
    pos_ptr,  # [T] int32 positions of the rows (HAS_POS), else unused
    out_ptr,  # [T, H, D]
    stride_qt, stride_qh,
    stride_c2, stride_cb, stride_cs, stride_ch,
    stride_tb,
    stride_ot, stride_oh,
    qk_scale, v_scale, head_dim, group,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows = (token, head) pairs per tile
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    HAS_POS: tl.constexpr,
    HEAVY_FIRST: tl.constexpr = False,  # launch the last (longest causal) row tiles first
):
    tile = tl.program_id(0)
    if HEAVY_FIRST:
        tile = tl.num_programs(0) - 1 - tile
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    q_lo = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_lo
    if tile * BLOCK_M >= q_len * group:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    start = seq_len - q_len

    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = r < q_len * group
    tok = r // group
    heads = kvh * group + r % group
    first_tok = (tile * BLOCK_M) // group
    last_tok = tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // group, q_len - 1)
    if HAS_POS:
        first_pos = tl.load(pos_ptr + q_lo + first_tok)
        last_pos = tl.load(pos_ptr + q_lo + last_tok)
        row_pos = tl.load(pos_ptr + q_lo + tok, mask=r_mask, other=0)
        row_pos = tl.where(r_mask, row_pos, last_pos)
    else:
        first_pos = start + first_tok
        last_pos = start + last_tok
        row_pos = start + tok
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    rows64 = (q_lo + tok).to(tl.int64)
    io_mask = r_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + rows64[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=io_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = tables_ptr + b.to(tl.int64) * stride_tb
    kv_head = cache_ptr + kvh.to(tl.int64) * stride_ch
    free_hi = ((first_pos + 1) // BLOCK_N) * BLOCK_N  # keys every row sees
    m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, kv_head, table, 0, free_hi, row_pos, d,
                                 d_mask, stride_c2, stride_cb, stride_cs, qk_scale,
                                 False, BLOCK_SIZE, BLOCK_N, UPCAST, PREC)
    m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, kv_head, table, free_hi, last_pos + 1,
                                 row_pos, d, d_mask, stride_c2, stride_cb, stride_cs, qk_scale,
                                 True, BLOCK_SIZE, BLOCK_N, UPCAST, PREC)
    o = acc * (v_scale / l_i)[:, None]
    dst = out_ptr + rows64[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=io_mask)


def prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                      max_query_len: int, out: torch.Tensor | None = None,
                      q_positions: torch.Tensor | None = None, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of the new tokens of a ragged batch over the paged cache.

    q [T, H, D] (sequence b owns rows [query_start_loc[b], query_start_loc[b+1]));
    kv_cache [2, N, bs, Hk, D], already holding all ``seq_lens[b]`` tokens of every sequence
    (run kv_write first); block_tables [B, max_blocks] int32; query_start_loc [B+1] int32;
    seq_lens [B] int32 >= query lens; max_query_len a host int >= every query length;
    q_positions [T] int32, optional: each row's position (ascending within a sequence, below
    its seq_len) when the rows are not the sequence's last ``q_len`` tokens. An fp8 kv_cache
    holds K / k_scale and V / v_scale.
    Returns ``out`` (a new [T, H, D] tensor in q's dtype unless given).
    """
    check_paged(q, kv_cache, block_tables, seq_lens)
    if not fp8_max(kv_cache.dtype):
        k_scale = v_scale = 1.0  # scales are an fp8 cache's only
    num_seqs = seq_lens.shape[0]
    check(query_start_loc.shape == (num_seqs + 1,),
          f"query_start_loc must be [B+1={num_seqs + 1}], got {tuple(query_start_loc.shape)}")
    check_int("query_start_loc", query_start_loc, (torch.int32,))
    check_same_device(q=q, query_start_loc=query_start_loc)
    if q_positions is not None:
        check(q_positions.shape == (q.shape[0],),
              f"q_positions must be [T={q.shape[0]}], got {tuple(q_positions.shape)}")
        check_int("q_positions", q_positions, (torch.int32,))
        check_same_device(q=q, q_positions=q_positions)
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = check_out(out, q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_m, block_n, warps, stages = tiles(head_dim, q_positions is not None, q.device)
    grid = (triton.cdiv(max_query_len * group, block_m), num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q, kv_cache, block_tables, query_start_loc, seq_lens,
        q_positions if q_positions is not None else seq_lens, out,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        scale * LOG2E * k_scale, v_scale, head_dim, group,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, next_pow2(head_dim)), UPCAST=dot_upcast(q.device),
        PREC=dot_precision(q.dtype), HAS_POS=q_positions is not None,
        HEAVY_FIRST=HEAVY_FIRST, num_warps=warps, num_stages=stages,
    )
    return out


# Row tiles in reverse order: a causal tile's work grows with its rows' positions, and the
# longest ones started first leave short ones for the tail of the grid (``bench/prefill_tune.py``
# measures both orders). Off: on an H100 (2026-12-07) it was no faster for the best tiles
# (120.3 vs 120.7% of SDPA at 4k tokens, 111.1 vs 112.6% at 16k).
HEAVY_FIRST = False


def tiles(head_dim: int, scattered: bool, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a launch, chosen by ``bench/prefill_tune.py``
    (all 36 tiles x warps x stages of its grid, llama-3-8b's attention shape, one H100,
    2026-12-07): 64 x 64, 4 warps, 2 stages was the fastest at 4k and at 16k tokens (120.7%
    and 112.6% of torch SDPA's flash kernel; 128 x 64 / 8 warps / 3 stages, used before,
    103.8% and 101.3%)."""
    if device.type == "cpu":  # interpreter: small tiles keep the masked waste low
        return 32, 16, 4, 1
    if head_dim > 128:
        return 64, 32, 4, 3
    if scattered:  # blending's scattered rows: not in the sweep, kept as they were
        return 64, 64, 4, 3
    return 64, 64, 4, 2

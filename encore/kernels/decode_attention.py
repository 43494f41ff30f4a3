"""Paged decode attention (one new token per sequence), GQA-aware, split-K.

Grid ``(B, Hk, S)``: the program for (sequence b, KV head h, split s) holds the G = H / Hk
query heads that share KV head h as the rows of one tile, so every KV page is read once
per KV head. Split s covers the context slice

    [s * part, min((s + 1) * part, seq_len))     part = ceil(seq_len / S) rounded up to BLOCK_N

walking it BLOCK_N tokens at a time (a tile may span several pages; each token finds its
page through the block table). With S > 1 (flash-decoding) each split writes its normalized
partial output and log-sum-exp, and ``_reduce_kernel`` merges the S partials; with S == 1
the first kernel writes the final output directly. Accumulation is fp32 throughout.

An fp8 cache (``cache.kv_cache_dtype``) holds K / k_scale and V / v_scale: tiles are widened
as they are loaded (the MMAs stay 16-bit), k_scale is folded into the softmax scale and
v_scale multiplies the output, so the pages cross HBM at half the bytes. With a bf16 q the
MMAs run in fp16 (``FP16_MMA``): fp8 -> fp16 is one hardware conversion per two values on
sm89+, fp8 -> bf16 goes through fp32; q (bf16) and p (in [0, 1]) lose nothing in fp16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from encore.kernels._common import (
    check,
    check_out,
    check_paged,
    dot_precision,
    dot_upcast,
    fp8_max,
    mma,
    next_pow2,
    pdl_gate,
    pdl_launch,
)

LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(
    q_ptr,  # [B, H, D]
    cache_ptr,  # [2, N, bs, Hk, D]
    tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [B, H, D]            (SPLIT == False)
    part_o_ptr,  # [B, H, S, D] fp32   (SPLIT == True)
    part_lse_ptr,  # [B, H, S] fp32     (SPLIT == True)
    stride_qb, stride_qh,
    stride_c2, stride_cb, stride_cs, stride_ch,
    stride_tb,
    stride_ob, stride_oh,
    qk_scale,  # softmax scale * log2(e) * k_scale
    v_scale,  # 1.0 unless the cache is fp8
    head_dim, group, num_splits,
    SPLIT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache page
    BLOCK_N: tl.constexpr,  # tokens per inner step (independent of the page size)
    BLOCK_G: tl.constexpr,  # padded query heads per KV head (>= 16 for tl.dot)
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    FP16_MMA: tl.constexpr,  # widen fp8 tiles to fp16 and run the MMAs in fp16
    PDL: tl.constexpr,  # programmatic dependent launch (``pdl_launch``)
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)  # before the gate: the KV write before never writes it
    part = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = s * part
    hi = tl.minimum(lo + part, seq_len)
    pdl_gate(PDL)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * group + g
    g_mask = g < group
    d_mask = d < head_dim
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [G, D]
    if FP16_MMA:
        q = q.to(tl.float16)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    table = tables_ptr + b64 * stride_tb
    kv_head = cache_ptr + kvh.to(tl.int64) * stride_ch
    for start in range(lo, hi, BLOCK_N):
        pos = start + n
        n_mask = pos < hi
        page = tl.load(table + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        tok = page * stride_cb + (pos % BLOCK_SIZE) * stride_cs  # [N] int64
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(kv_head + tok[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(kv_head + stride_c2 + tok[:, None] + d[None, :], mask=kv_mask,
                    other=0.0).to(q.dtype)
        qk = mma(q, tl.trans(k), UPCAST, PREC) * qk_scale  # [G, N], log2 units
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST, PREC)
        m_i = m_new

    acc = acc * v_scale
    out_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        # An empty split (lo >= hi) leaves l_i = 0: it writes lse = -inf and zeros.
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        row = (b64 * tl.num_programs(1) * group + heads) * num_splits + s  # [G]
        tl.store(part_o_ptr + row[:, None] * head_dim + d[None, :], o, mask=out_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)
    else:
        o = acc / l_i[:, None]
        dst = out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _reduce_kernel(
    part_o_ptr,  # [B, H, S, D] fp32
    part_lse_ptr,  # [B, H, S] fp32 (log2 units)
    out_ptr,  # [B, H, D]
    stride_ob, stride_oh,
    num_heads, head_dim, num_splits,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_gate(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    row = (b * num_heads + h) * num_splits + sp
    lse = tl.load(part_lse_ptr + row, mask=sp < num_splits, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # split 0 is never empty, so max is finite
    mask = (sp[:, None] < num_splits) & (d[None, :] < head_dim)
    o = tl.load(part_o_ptr + row[:, None] * head_dim + d[None, :], mask=mask, other=0.0)
    o = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty),
             mask=d < head_dim)


def _num_splits(batch: int, num_kv_heads: int, max_seq_len: int, block_n: int) -> int:
    """Enough splits to give ~2 waves of programs on a large GPU, one tile each at most (a
    split covers whole tiles, so more splits than tiles would only add empty programs), and
    one pass up to 2 tiles (a reduce costs more than it saves there).

    A function of ``next_pow2(max_seq_len)``, not of max_seq_len itself: the decode CUDA
    graphs capture one graph per power-of-two context bucket, and an eager step at the same
    context then picks the same count (the same kernels, bit-identical outputs).

    No "one pass below 4k tokens" rule: inside a CUDA graph on an H200 (bench/gpu.py,
    batch 1, 600 tokens, llama-3-8b) one pass over 8 KV heads took 18 us a layer against
    ~7 us for 33 splits + the reduce; the kernel benchmark that favoured one pass timed
    Python launches, where the second launch's host cost hid the split's gain.
    """
    target_programs = 264
    by_occupancy = triton.cdiv(target_programs, max(batch * num_kv_heads, 1))
    tiles = next_pow2(max_seq_len) // block_n
    by_length = tiles if tiles > 2 else 1
    return max(1, min(by_occupancy, by_length, 64))


# Software pipelining: an fp8 tile is half the bytes of a 16-bit one, so fp8 keeps 5 tiles in
# flight (H100, ``--only fp8``, one llama-3-8b layer, fp16 MMAs: B=256 x 1k 227 vs 256 us at 3
# stages, B=512 x 1k 426 vs 474, B=64 x 1k 81 vs 89, B=1 x 4k 25 vs 33); 16-bit pages gain
# nothing from 4 (B=256 x 1k 361 vs 362 us) and keep 3.
# Tokens a tile (any size works: each token finds its own page). fp8 pages at 128 (the same
# bytes in flight as 16-bit pages at 64) were slower where the batch is large and much slower
# at batch 1 (H100, ``bench/kernel_bench.py --only fp8``, llama-3-8b layer: B=256 at 1k/2k
# tokens 291/550 vs 275/526 us, B=1 at 4k 52.8 vs 28.4 us; only B=64 at 1k favoured 128,
# 82.9 vs 97.0 us): every cache dtype takes 64.
BLOCK_N = 64


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, max_seq_len: int,
                     num_splits: int | None = None, out: torch.Tensor | None = None,
                     k_scale: float = 1.0, v_scale: float = 1.0,
                     block_n: int = BLOCK_N, launch: dict | None = None,
                     pdl: bool = False) -> torch.Tensor:
    """Attention of one query token per sequence over its paged context.

    q [B, H, D]; kv_cache [2, N, bs, Hk, D] (q's dtype, or fp8 holding K / k_scale and
    V / v_scale); block_tables [B, max_blocks]
    int32; seq_lens [B] int32, each >= 1 (context including the new token, whose K/V must
    already be in the cache); max_seq_len >= max(seq_lens) (a host int: no device sync).
    Returns ``out`` (a new [B, H, D] tensor in q's dtype unless given; a static buffer suits
    CUDA graphs). ``num_splits`` overrides the split-K choice, ``block_n`` the tokens a tile
    (``BLOCK_N``), ``launch`` the main kernel's launch options (num_warps, num_stages,
    FP16_MMA: ``bench/kernel_bench.py``'s sweeps). ``pdl``: launch as a programmatic
    dependent (``pdl_launch``); the kernel before must not write seq_lens (read before its
    end). The split reduce is always one (it reads nothing before its gate).
    """
    check_paged(q, kv_cache, block_tables, seq_lens)
    fp8 = fp8_max(kv_cache.dtype) > 0
    if not fp8:
        k_scale = v_scale = 1.0  # scales are an fp8 cache's only
    check(q.shape[0] == seq_lens.shape[0], f"q has {q.shape[0]} rows for {seq_lens.shape[0]} seqs")
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    out = check_out(out, q)
    if batch == 0:
        return out
    splits = num_splits or _num_splits(batch, num_kv_heads, max_seq_len, block_n)
    group = num_heads // num_kv_heads
    common = dict(BLOCK_SIZE=block_size, BLOCK_N=block_n, BLOCK_G=max(16, next_pow2(group)),
                  BLOCK_D=max(16, next_pow2(head_dim)), UPCAST=dot_upcast(q.device),
                  PREC=dot_precision(q.dtype))
    options = {"num_stages": 2 if head_dim > 128 else 5 if fp8 else 3,
               "FP16_MMA": fp8 and q.dtype == torch.bfloat16, **common} | (launch or {})
    part_o = part_lse = out  # placeholders when SPLIT is off (never dereferenced)
    if splits > 1:
        part_o = torch.empty(batch, num_heads, splits, head_dim, device=q.device,
                             dtype=torch.float32)
        part_lse = torch.empty(batch, num_heads, splits, device=q.device, dtype=torch.float32)
    _decode_kernel[(batch, num_kv_heads, splits)](
        q, kv_cache, block_tables, seq_lens, out, part_o, part_lse,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        scale * LOG2E * k_scale, v_scale, head_dim, group, splits,
        SPLIT=splits > 1, **options, **pdl_launch(q.device, pdl),
    )
    if splits > 1:
        _reduce_kernel[(batch, num_heads)](
            part_o, part_lse, out, out.stride(0), out.stride(1), num_heads, head_dim,
            splits, BLOCK_S=next_pow2(splits), BLOCK_D=next_pow2(head_dim),
            **pdl_launch(q.device),
        )
    return out

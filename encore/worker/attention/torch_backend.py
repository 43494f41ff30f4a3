"""Reference attention over paged KV in plain torch (the CPU backend).

Per sequence: gather its context K/V from the block table, then scaled-dot-product attention
with a causal mask offset by ``start_pos`` (new token i sees positions ``<= start_pos + i``).
Decode-only steps take one batched path (``decode_attention``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from encore.kernels.reference import as_raw, to_kv
from encore.worker.attention.base import AttentionBackend, AttentionMetadata


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Store new K/V ([T, Hk, D]) at their flat slots of ``kv_cache`` ([2, N, bs, Hk, D]);
    an fp8 cache (written as bytes: the CPU's index_copy_ takes no fp8) holds K / k_scale and
    V / v_scale."""
    flat = as_raw(kv_cache).view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    if kv_cache.dtype == k.dtype:  # one copy for both (a batch-1 step: 6 vs 11 us a layer)
        flat.index_copy_(1, slot_mapping, torch.stack((k, v)))
        return
    for i, (x, scale) in enumerate(((k, k_scale), (v, v_scale))):
        flat[i].index_copy_(0, slot_mapping, as_raw(to_kv(x, kv_cache.dtype, scale)))


def widen(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Cache entries ``x`` in ``dtype`` (an fp8 cache's times its scale)."""
    return x.to(dtype) * scale if x.dtype.itemsize == 1 else x.to(dtype)


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor,
              seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of positions [0, seq_len) of one sequence: two [seq_len, Hk, D] tensors."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = kv_cache[:, block_table[:num_blocks]]  # [2, nb, bs, Hk, D]
    blocks = blocks.flatten(1, 2)[:, :seq_len]
    return blocks[0], blocks[1]


@contextlib.contextmanager
def one_thread(on: bool) -> Iterator[None]:
    """torch's CPU ops on one thread inside the block (when ``on``), the count restored after."""
    before = torch.get_num_threads()
    if on and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """One query token per sequence: gather every context padded to the longest, then two
    float32 batched matmuls around a softmax, each query head against its KV head's keys.

    One sequence on the CPU runs on one thread: its ops are too small to split, and each
    parallel region stalls when another process (the server's P0 and P1, on the same cores)
    preempts one of the two threads. 2-core EPYC, SmolLM2 int4 served at concurrency 1,
    alternating 7 pairs: 62.5 vs 50.4 tok/s median (one thread won 6 of 7); one layer alone
    at 150 / 1,000 tokens: 72 vs 90-189 us / 232 vs 849 us. From two sequences on, two
    threads were faster in 10 of 11 shapes measured (1.04-1.6x at 2-64 sequences; 4 x 150
    tokens 0.72x), and keep them.

    q [B, H, D] -> [B, H, D]. Padding positions are masked out by ``seq_lens``. Not torch's
    SDPA, whose CPU kernel costs more for one query row (2-core EPYC, bf16 cache, one layer
    of SmolLM2's shape, two runs: batch 1 at 136 tokens 101-137 vs 164-190 us, at 1k tokens
    0.30-0.39 vs 0.94-1.21 ms; batch 8 at 300 tokens 0.63-1.18 vs 1.41-2.26 ms; below ~64
    tokens SDPA is 5-15 us faster). The scores are float32, as in the GPU kernels.
    """
    with one_thread(q.shape[0] == 1 and q.device.type == "cpu"):
        return _decode_attention(q, kv_cache, meta, scale, k_scale, v_scale)


def _decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float, k_scale: float, v_scale: float) -> torch.Tensor:
    block_size, seq = kv_cache.shape[2], meta.max_seq_len
    b, h, d = q.shape
    nb = (seq + block_size - 1) // block_size
    blocks = kv_cache.index_select(1, meta.block_tables[:, :nb].flatten())  # 2-3x indexing's speed
    kv = blocks.view(2, b, nb * block_size, *kv_cache.shape[3:])[:, :, :seq]  # [2, B, S, Hk, D]
    if kv.dtype.itemsize == 1:  # fp8: K and V have their own scales
        k, v = widen(kv[0], torch.float32, k_scale), widen(kv[1], torch.float32, v_scale)
    else:  # one conversion for both
        k, v = kv.float().unbind(0)
    k, v = k.permute(0, 2, 3, 1), v.transpose(1, 2)  # [B, Hk, D, S], [B, Hk, S, D]
    hk = k.shape[1]
    scores = torch.matmul(q.view(b, hk, h // hk, d).float(), k)  # [B, Hk, group, S]
    if min(meta.start_pos) + 1 < seq:  # ragged contexts: hide each row's padding
        cols = torch.arange(seq, device=q.device)
        pad = (cols[None, :] >= meta.seq_lens[:, None]).view(b, 1, 1, seq)
        scores.masked_fill_(pad, float("-inf"))
    probs = torch.softmax(scores.mul_(scale), -1)
    return torch.matmul(probs, v).view(b, h, d).to(q.dtype)


class TorchAttentionBackend(AttentionBackend):
    """Correct for ragged batches, prefix hits and chunked prefill; decode batched in one call."""

    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        write_kv(kv_cache, k, v, meta.slot_mapping, k_scale, v_scale)
        return self.attend(q, kv_cache, meta, scale, k_scale, v_scale)

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        if meta.is_decode_only:
            return decode_attention(q, kv_cache, meta, scale, k_scale, v_scale)
        out = torch.empty_like(q)
        num_heads, num_kv_heads = q.shape[1], kv_cache.shape[3]
        tables = meta.block_tables
        q_start = 0
        for i, (qlen, start) in enumerate(zip(meta.query_lens, meta.start_pos, strict=True)):
            seq_len = start + qlen
            kc, vc = gather_kv(kv_cache, tables[i], seq_len)
            qi = q[q_start:q_start + qlen].transpose(0, 1)  # [H, q, D]
            kc = widen(kc.transpose(0, 1), q.dtype, k_scale)  # [Hk, S, D]
            vc = widen(vc.transpose(0, 1), q.dtype, v_scale)
            if num_heads != num_kv_heads:
                rep = num_heads // num_kv_heads
                kc = kc.repeat_interleave(rep, dim=0)
                vc = vc.repeat_interleave(rep, dim=0)
            mask = None
            if meta.q_positions is not None:
                rows = meta.q_positions[q_start:q_start + qlen, None]
                mask = torch.arange(seq_len, device=q.device)[None, :] <= rows
            elif qlen > 1:
                rows = torch.arange(qlen, device=q.device)[:, None] + start
                cols = torch.arange(seq_len, device=q.device)[None, :]
                mask = cols <= rows
            # 4-D inputs: torch's CPU flash kernel takes them; 3-D ones fall back to the math
            # path (measured 9x slower at 2k tokens, bf16, 2-core Xeon).
            o = F.scaled_dot_product_attention(qi[None], kc[None], vc[None], attn_mask=mask,
                                               scale=scale)[0]
            out[q_start:q_start + qlen] = o.transpose(0, 1)
            q_start += qlen
        return out

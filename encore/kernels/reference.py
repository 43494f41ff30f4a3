"""Torch twins of every Triton kernel: the same contract, plain torch, fp32 math.

Each function here is what the kernel of the same name in its own module must compute
(tests compare the two by relative error). Slow and obvious on purpose.

KV cache of one layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K at 0, V at 1);
position ``p`` of a sequence lives at block ``block_table[p // block_size]``, offset
``p % block_size``; its flat slot is ``block * block_size + offset``.
"""

from __future__ import annotations

import torch


# ----------------------------------------------------------------------------- KV write
def kv_write(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Store k, v ([T, Hk, D]) at flat slots ``slot_mapping`` ([T]); slot -1 is skipped.
    An fp8 cache stores k / k_scale and v / v_scale, saturated."""
    flat = kv_cache.view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    flat[0][slots] = to_kv(k[keep], kv_cache.dtype, k_scale)
    flat[1][slots] = to_kv(v[keep], kv_cache.dtype, v_scale)


def to_kv(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``x`` as a cache of ``dtype`` stores it: fp8 holds x / scale, saturated."""
    if dtype.itemsize > 1:
        return x.to(dtype)
    bound = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-bound, bound).to(dtype)


def from_kv(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """fp32 values of cache entries ``x`` (an fp8 cache's times its scale)."""
    return x.float() * scale if x.dtype.itemsize == 1 else x.float()


# ----------------------------------------------------------------------------- attention
def _context(kv_cache: torch.Tensor, table: torch.Tensor, seq_len: int,
             k_scale: float = 1.0, v_scale: float = 1.0):
    """fp32 K, V of positions [0, seq_len) of one sequence: two [Hk, seq_len, D]."""
    bs = kv_cache.shape[2]
    nb = (seq_len + bs - 1) // bs
    blocks = kv_cache[:, table[:nb].long()].flatten(1, 2)[:, :seq_len]
    return (from_kv(blocks[0], k_scale).transpose(0, 1),
            from_kv(blocks[1], v_scale).transpose(0, 1))


def _attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, start: int,
            scale: float, positions: torch.Tensor | None = None) -> torch.Tensor:
    """q [n, H, D] at positions start..start+n-1 (or ``positions`` [n]) over kc/vc
    [Hk, S, D]; causal, GQA."""
    n, h = q.shape[0], q.shape[1]
    rep = h // kc.shape[0]
    kc, vc = kc.repeat_interleave(rep, 0), vc.repeat_interleave(rep, 0)
    s = torch.einsum("nhd,hsd->hns", q.float(), kc) * scale
    rows = torch.arange(n)[:, None] + start if positions is None else positions.cpu()[:, None]
    cols = torch.arange(kc.shape[1])[None, :]
    s = s.masked_fill((cols > rows).to(s.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hns,hsd->nhd", p, vc)


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, k_scale: float = 1.0,
                     v_scale: float = 1.0) -> torch.Tensor:
    """One query token per sequence. q [B, H, D] attends to its ``seq_lens[b]`` cached tokens."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        kc, vc = _context(kv_cache, block_tables[b], n, k_scale, v_scale)
        out[b] = _attend(q[b:b + 1], kc, vc, n - 1, scale)[0].to(q.dtype)
    return out


def prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      scale: float, q_positions: torch.Tensor | None = None,
                      k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Ragged causal attention of new tokens q [T, H, D] over the paged cache.

    Sequence b owns q rows [qsl[b], qsl[b+1]); they sit at the last positions of its
    ``seq_lens[b]`` tokens (or at ``q_positions`` [T], ascending per sequence), all of which
    are already in the cache.
    """
    out = torch.empty_like(q)
    for b in range(seq_lens.shape[0]):
        lo, hi, n = int(query_start_loc[b]), int(query_start_loc[b + 1]), int(seq_lens[b])
        if hi == lo:
            continue
        kc, vc = _context(kv_cache, block_tables[b], n, k_scale, v_scale)
        pos = None if q_positions is None else q_positions[lo:hi]
        out[lo:hi] = _attend(q[lo:hi], kc, vc, n - (hi - lo), scale, pos).to(q.dtype)
    return out


# ----------------------------------------------------------------------------- RoPE
def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Plain (unscaled) RoPE inverse frequencies, fp32 [head_dim // 2], as HF Llama."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def _rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Neox / rotate-half RoPE of x [N, H, D] at positions pos [N] (fp32 math)."""
    ang = pos.float()[:, None] * inv_freq.float().to(x.device)[None, :]  # [N, D/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
            inv_freq: torch.Tensor) -> None:
    """In place: rotate q [T, H, D] and k [T, Hk, D] to their positions [T]."""
    q.copy_(_rotate(q, positions, inv_freq))
    k.copy_(_rotate(k, positions, inv_freq))


def rerotate_copy(kv_caches: list[torch.Tensor], src_slots: torch.Tensor,
                  dst_slots: torch.Tensor, deltas: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """In every layer cache: K and V of flat slots ``src_slots`` to ``dst_slots``, keys
    moved by ``deltas``."""
    for kv_cache in kv_caches:
        # as bytes: the CPU's index ops do not take fp8 (a rotation needs no fp8 scale)
        flat = as_raw(kv_cache).view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
        keys = flat[0].index_select(0, src_slots).view(kv_cache.dtype)
        keys = to_kv(_rotate(keys.float(), deltas, inv_freq), kv_cache.dtype)
        flat[0].index_copy_(0, dst_slots, as_raw(keys))
        flat[1].index_copy_(0, dst_slots, flat[1].index_select(0, src_slots))


def as_raw(t: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor as uint8 (same shape), for index ops (the CPU's take no fp8) and byte
    copies; others as they are."""
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


def rope_rerotate_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor,
                         deltas: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """In place: move the cached keys of blocks ``block_ids`` [n] by ``deltas`` [n] positions.

    RoPE at p then at delta equals RoPE at p + delta (rotations in the same planes add), so
    a chunk computed at position p becomes, in its K, the chunk at p + delta. V is untouched.
    """
    for i in range(block_ids.shape[0]):
        blk = kv_cache[0, int(block_ids[i])]  # [bs, Hk, D]
        pos = torch.full((blk.shape[0],), int(deltas[i]), dtype=torch.int64)
        blk.copy_(_rotate(blk, pos, inv_freq))


# ----------------------------------------------------------------------------- block copy
def gather_blocks(pool: torch.Tensor, block_ids: torch.Tensor, block_dim: int) -> torch.Tensor:
    """Blocks ``block_ids`` of ``pool`` (indexed along ``block_dim``) as [n, *rest]."""
    return pool.index_select(block_dim, block_ids.long()).movedim(block_dim, 0).contiguous()


def scatter_blocks(staging: torch.Tensor, pool: torch.Tensor, block_ids: torch.Tensor,
                   block_dim: int) -> None:
    """Inverse of gather_blocks: write staging [n, *rest] into ``pool`` at ``block_ids``."""
    pool.index_copy_(block_dim, block_ids.long(), staging.movedim(0, block_dim).to(pool.dtype))


# ----------------------------------------------------------------------------- RMSNorm
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = (x [+ residual]) / rms * weight, fp32 math. With a residual, the sum (rounded to
    the residual's dtype) is written back into ``residual`` and returned as the second value."""
    if residual is not None:
        residual.copy_((x.float() + residual.float()).to(residual.dtype))
        x = residual
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype), residual


# ----------------------------------------------------------------------------- activation
def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up of gate_up [T, 2I] = [gate | up] -> [T, I], fp32 math."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)


# ----------------------------------------------------------------------------- GEMV
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         norm_weight: torch.Tensor | None = None, eps: float = 1e-6, swiglu: bool = False,
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """One-row linear: x [1, K] @ weight [N, K]^T (+ bias [N]) -> [1, N], fp32 math; with
    ``norm_weight`` of RMSNorm(x) * norm_weight (not rounded in between), ``swiglu`` of
    silu(gate) * up for weight [gate | up], ``residual``: the rounded result added into it
    (in place, rounded again) and returned."""
    xf = x.float()
    if norm_weight is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    y = xf @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    if residual is None:
        return y.to(x.dtype)
    residual.copy_(residual.float() + y.to(x.dtype).float())
    return residual

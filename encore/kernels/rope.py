"""Rotary position embedding (neox / rotate-half convention, as HF Llama), three kernels.

For a head vector x = [x1 | x2] (halves of D/2) at position p, with angle a_i = p * inv_freq[i]:

    rope(x, p) = [x1 * cos a - x2 * sin a | x2 * cos a + x1 * sin a]

``rope_qk`` rotates the new tokens' q and k in place; ``rope_kv_write`` rotates q in place
and writes the rotated k (not written back) and v into the paged cache, one launch instead of
``rope_qk`` + ``kv_write`` (the same values: k rounded to its dtype before the cache's cast,
as the two kernels do). ``rope_rerotate_blocks`` moves cached
keys by a position delta: rotations in the same planes compose by adding angles, so
rope(rope(x, p), delta) == rope(x, p + delta) and a chunk's K computed at p is re-homed at
p + delta without its pre-RoPE keys (V has no position). ``rerotate_copy`` does the same
token by token while copying K and V to other slots (a chunk placed into a sequence at any
offset, ``worker/blend.py``). An fp8 cache holds K / k_scale: a rotation is linear, so the
stored values rotate as they are (no scale needed). ``inv_freq`` ([D/2] fp32) carries
theta and any frequency scaling (llama3, linear): precompute it with the model's rule.
Angles are fp32 products ``float(p) * inv_freq`` as in HF, so the twin matches exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from encore.kernels._common import (
    check,
    check_float,
    check_int,
    check_kv_cache,
    check_last_contiguous,
    check_same_device,
    fp8_max,
    fp8_scaled,
    next_pow2,
    pdl_gate,
    pdl_launch,
)


@triton.jit
def _rotated(x1, x2, cos, sin):
    """The two halves [x1 | x2] (fp32 tiles [heads, D/2]) rotated by the angles' cos, sin
    ([D/2]): the formula every kernel here applies."""
    return x1 * cos[None, :] - x2 * sin[None, :], x2 * cos[None, :] + x1 * sin[None, :]


@triton.jit
def _rotate_tile(ptr, stride_h, num_heads, cos, sin, half,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """In place: rotate the [num_heads, 2 * half] rows at ptr (head stride stride_h)."""
    h = tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    mask = (h[:, None] < num_heads) & (i[None, :] < half)
    p1 = ptr + h[:, None] * stride_h + i[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + half, mask=mask, other=0.0).to(tl.float32)
    ty = ptr.dtype.element_ty
    y1, y2 = _rotated(x1, x2, cos, sin)
    tl.store(p1, y1.to(ty), mask=mask)
    tl.store(p1 + half, y2.to(ty), mask=mask)


@triton.jit
def _angles(pos, inv_freq_ptr, half, BLOCK_HALF: tl.constexpr):
    i = tl.arange(0, BLOCK_HALF)
    ang = pos.to(tl.float32) * tl.load(inv_freq_ptr + i, mask=i < half, other=0.0)
    return tl.cos(ang), tl.sin(ang)


@triton.jit
def _rope_qk_kernel(
    q_ptr,  # [T, H, D]
    k_ptr,  # [T, Hk, D]
    pos_ptr,  # [T] int64
    inv_freq_ptr,  # [D/2] fp32
    stride_qt, stride_qh, stride_kt, stride_kh,
    num_heads, num_kv_heads, half,
    BLOCK_H: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _angles(tl.load(pos_ptr + t), inv_freq_ptr, half, BLOCK_HALF)
    if tl.program_id(1) == 0:  # q and k of a token in two programs: half the latency
        _rotate_tile(q_ptr + t * stride_qt, stride_qh, num_heads, cos, sin, half,
                     BLOCK_H, BLOCK_HALF)
    else:
        _rotate_tile(k_ptr + t * stride_kt, stride_kh, num_kv_heads, cos, sin, half,
                     BLOCK_HK, BLOCK_HALF)


@triton.jit
def _rope_kv_write_kernel(
    q_ptr,  # [T, H, D]
    k_ptr,  # [T, Hk, D]
    v_ptr,  # [T, Hk, D]
    pos_ptr,  # [T] int64
    inv_freq_ptr,  # [D/2] fp32
    cache_ptr,  # [2, N, bs, Hk, D]
    slot_ptr,  # [T] int64 (-1: padding, nothing written)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_c2, stride_cb, stride_cs, stride_ch,
    num_heads, num_kv_heads, half,
    inv_k_scale, inv_v_scale,
    FP8_MAX: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (``pdl_launch``)
):
    # Before the gate: the angles and the slot (the projection before never writes them).
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _angles(tl.load(pos_ptr + t), inv_freq_ptr, half, BLOCK_HALF)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    pdl_gate(PDL)
    if tl.program_id(1) == 0:
        _rotate_tile(q_ptr + t * stride_qt, stride_qh, num_heads, cos, sin, half,
                     BLOCK_H, BLOCK_HALF)
    else:
        if slot >= 0:
            h = tl.arange(0, BLOCK_HK)
            i = tl.arange(0, BLOCK_HALF)
            mask = (h[:, None] < num_kv_heads) & (i[None, :] < half)
            pk = k_ptr + t * stride_kt + h[:, None] * stride_kh + i[None, :]
            pv = v_ptr + t * stride_vt + h[:, None] * stride_vh + i[None, :]
            x1 = tl.load(pk, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(pk + half, mask=mask, other=0.0).to(tl.float32)
            k1, k2 = _rotated(x1, x2, cos, sin)
            ty = k_ptr.dtype.element_ty  # k rounded to its dtype first, as rope_qk leaves it
            k1, k2 = k1.to(ty), k2.to(ty)
            v1 = tl.load(pv, mask=mask, other=0.0)
            v2 = tl.load(pv + half, mask=mask, other=0.0)
            dst = (cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
                   + h[:, None] * stride_ch + i[None, :])
            out = cache_ptr.dtype.element_ty
            tl.store(dst, fp8_scaled(k1, inv_k_scale, FP8_MAX).to(out), mask=mask)
            tl.store(dst + half, fp8_scaled(k2, inv_k_scale, FP8_MAX).to(out), mask=mask)
            tl.store(dst + stride_c2, fp8_scaled(v1, inv_v_scale, FP8_MAX).to(out), mask=mask)
            tl.store(dst + stride_c2 + half, fp8_scaled(v2, inv_v_scale, FP8_MAX).to(out),
                     mask=mask)


@triton.jit
def _rerotate_kernel(
    cache_ptr,  # [2, N, bs, Hk, D]; only K (index 0) is touched
    block_ids_ptr,  # [n] int64
    deltas_ptr,  # [n] int64
    inv_freq_ptr,  # [D/2] fp32
    stride_cb, stride_cs, stride_ch,
    num_kv_heads, half,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    i = tl.program_id(0)
    slot = tl.program_id(1)
    block = tl.load(block_ids_ptr + i).to(tl.int64)
    cos, sin = _angles(tl.load(deltas_ptr + i), inv_freq_ptr, half, BLOCK_HALF)
    ptr = cache_ptr + block * stride_cb + slot * stride_cs
    _rotate_tile(ptr, stride_ch, num_kv_heads, cos, sin, half, BLOCK_HK, BLOCK_HALF)


@triton.jit
def _rerotate_copy_kernel(
    layers_ptr,  # [L] int64: data_ptr of each layer's cache [2, N, bs, Hk, D]
    src_ptr,  # [n] int64 flat slots
    dst_ptr,  # [n] int64 flat slots
    deltas_ptr,  # [n] int64
    inv_freq_ptr,  # [D/2] fp32
    stride_c2, stride_cs, stride_ch,
    num_kv_heads, half,
    DTYPE: tl.constexpr,
    FP8_MAX: tl.constexpr,  # > 0: an fp8 cache (its scale commutes with the rotation)
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    i = tl.program_id(0)
    cache_ptr = tl.load(layers_ptr + tl.program_id(1)).to(tl.pointer_type(DTYPE))
    src = cache_ptr + tl.load(src_ptr + i).to(tl.int64) * stride_cs
    dst = cache_ptr + tl.load(dst_ptr + i).to(tl.int64) * stride_cs
    cos, sin = _angles(tl.load(deltas_ptr + i), inv_freq_ptr, half, BLOCK_HALF)
    h = tl.arange(0, BLOCK_HK)
    j = tl.arange(0, BLOCK_HALF)
    mask = (h[:, None] < num_kv_heads) & (j[None, :] < half)
    offs = h[:, None] * stride_ch + j[None, :]
    k1 = tl.load(src + offs, mask=mask, other=0.0)
    k2 = tl.load(src + offs + half, mask=mask, other=0.0)
    v1 = tl.load(src + stride_c2 + offs, mask=mask, other=0.0)
    v2 = tl.load(src + stride_c2 + offs + half, mask=mask, other=0.0)
    y1, y2 = _rotated(k1.to(tl.float32), k2.to(tl.float32), cos, sin)
    if FP8_MAX > 0:
        y1 = tl.clamp(y1, -FP8_MAX, FP8_MAX)
        y2 = tl.clamp(y2, -FP8_MAX, FP8_MAX)
    tl.store(dst + offs, y1.to(DTYPE), mask=mask)
    tl.store(dst + offs + half, y2.to(DTYPE), mask=mask)
    tl.store(dst + stride_c2 + offs, v1, mask=mask)
    tl.store(dst + stride_c2 + offs + half, v2, mask=mask)


def _check_inv_freq(inv_freq: torch.Tensor, head_dim: int) -> None:
    check(head_dim % 2 == 0, f"head_dim must be even for RoPE, got {head_dim}")
    check(inv_freq.shape == (head_dim // 2,) and inv_freq.dtype == torch.float32,
          f"inv_freq must be fp32 [{head_dim // 2}], got {inv_freq.dtype} "
          f"{tuple(inv_freq.shape)}")
    check(inv_freq.is_contiguous(), "inv_freq must be contiguous")


def _check_heads(**tensors: torch.Tensor) -> None:
    """Each of ``tensors`` is [T, heads, D] float with its last dim contiguous."""
    for name, t in tensors.items():
        check(t.dim() == 3, f"{name} must be [T, heads, D], got {tuple(t.shape)}")
        check_float(name, t)
        check_last_contiguous(name, t)


def _check_positions(positions: torch.Tensor, inv_freq: torch.Tensor, head_dim: int) -> None:
    """Contiguous int positions and the fp32 inverse frequencies of ``head_dim``."""
    check_int("positions", positions, (torch.int64, torch.int32))
    check(positions.is_contiguous(), "positions must be contiguous")
    _check_inv_freq(inv_freq, head_dim)


def rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
            inv_freq: torch.Tensor) -> None:
    """In place: rotate q [T, H, D] and k [T, Hk, D] (views of a fused qkv are fine: only the
    last dim must be contiguous) to ``positions`` [T] int64 using ``inv_freq`` [D/2] fp32."""
    _check_heads(q=q, k=k)
    check(q.shape[0] == k.shape[0] == positions.shape[0] and q.shape[2] == k.shape[2],
          f"q {tuple(q.shape)}, k {tuple(k.shape)}, positions {tuple(positions.shape)} disagree")
    _check_positions(positions, inv_freq, q.shape[2])
    check_same_device(q=q, k=k, positions=positions, inv_freq=inv_freq)
    if q.shape[0] == 0:
        return
    half = q.shape[2] // 2
    _rope_qk_kernel[(q.shape[0], 2)](
        q, k, positions, inv_freq, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q.shape[1], k.shape[1], half,
        BLOCK_H=next_pow2(q.shape[1]), BLOCK_HK=next_pow2(k.shape[1]),
        BLOCK_HALF=next_pow2(half),
    )


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  inv_freq: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  k_scale: float = 1.0, v_scale: float = 1.0, pdl: bool = False) -> None:
    """``rope_qk`` then ``kv_write`` in one launch: q [T, H, D] rotated in place; k [T, Hk, D]
    rotated into the cache (k itself is left as it was), v [T, Hk, D] copied, at
    ``slot_mapping`` ([T] int64, -1 = skip) of ``kv_cache`` [2, N, bs, Hk, D]. An fp8 cache
    holds k / k_scale and v / v_scale (saturated). ``pdl``: launch as a programmatic
    dependent (``pdl_launch``); the kernel before must not write positions or slot_mapping
    (read before its end)."""
    _check_heads(q=q, k=k, v=v)
    check_kv_cache(kv_cache)
    _, _, block_size, hk, d = kv_cache.shape
    check(k.shape[1:] == (hk, d) and v.shape[1:] == (hk, d) and q.shape[2] == d,
          f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match kv_cache "
          f"[2, N, bs, {hk}, {d}]")
    check(q.shape[0] == k.shape[0] == v.shape[0] == positions.shape[0]
          == slot_mapping.shape[0],
          f"q, k, v, positions and slot_mapping disagree on T: {q.shape[0]}, {k.shape[0]}, "
          f"{v.shape[0]}, {tuple(positions.shape)}, {tuple(slot_mapping.shape)}")
    check_int("slot_mapping", slot_mapping, (torch.int64, torch.int32))
    _check_positions(positions, inv_freq, d)
    check_same_device(q=q, k=k, v=v, positions=positions, inv_freq=inv_freq, kv_cache=kv_cache,
                      slot_mapping=slot_mapping)
    if q.shape[0] == 0:
        return
    half = d // 2
    _rope_kv_write_kernel[(q.shape[0], 2)](
        q, k, v, positions, inv_freq, kv_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        q.shape[1], hk, half, 1.0 / k_scale, 1.0 / v_scale, FP8_MAX=fp8_max(kv_cache.dtype),
        BLOCK_SIZE=block_size, BLOCK_H=next_pow2(q.shape[1]), BLOCK_HK=next_pow2(hk),
        BLOCK_HALF=next_pow2(half), **pdl_launch(q.device, pdl),
    )


def rope_rerotate_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor,
                         deltas: torch.Tensor | int, inv_freq: torch.Tensor) -> None:
    """In place: move the keys of cache blocks ``block_ids`` ([n] int64) by ``deltas``
    positions (an int for all, or [n] int64, may be negative). Every slot of each block is
    rotated, so callers pass only blocks whose slots all belong to the moved chunk (or do not
    care about the rest). kv_cache [2, N, bs, Hk, D]; V is untouched."""
    check_kv_cache(kv_cache)
    check(block_ids.dim() == 1, f"block_ids must be [n], got {tuple(block_ids.shape)}")
    check_int("block_ids", block_ids, (torch.int64,))
    if isinstance(deltas, int):
        deltas = torch.full_like(block_ids, deltas)
    check(deltas.shape == block_ids.shape, f"deltas {tuple(deltas.shape)} must match "
          f"block_ids {tuple(block_ids.shape)}")
    check_int("deltas", deltas, (torch.int64,))
    _check_inv_freq(inv_freq, kv_cache.shape[4])
    check_same_device(kv_cache=kv_cache, block_ids=block_ids, deltas=deltas, inv_freq=inv_freq)
    if block_ids.shape[0] == 0:
        return
    hk, half = kv_cache.shape[3], kv_cache.shape[4] // 2
    _rerotate_kernel[(block_ids.shape[0], kv_cache.shape[2])](
        kv_cache, block_ids, deltas, inv_freq,
        kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), hk, half,
        BLOCK_HK=next_pow2(hk), BLOCK_HALF=next_pow2(half),
    )


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float8_e4m3fn: tl.float8e4nv, torch.float8_e5m2: tl.float8e5}


def layer_pointers(kv_caches: list[torch.Tensor]) -> torch.Tensor:
    """[L] int64 device tensor of the layers' cache addresses, for ``rerotate_copy`` (build it
    once: it is a host-to-device copy). The caches must share shape, strides, dtype, device."""
    first = kv_caches[0]
    for c in kv_caches:
        check_kv_cache(c)
        check(c.shape == first.shape and c.stride() == first.stride()
              and c.dtype == first.dtype and c.device == first.device,
              "every layer's KV cache must have the same shape, strides, dtype and device")
    return torch.tensor([c.data_ptr() for c in kv_caches], dtype=torch.int64,
                        device=first.device)


def rerotate_copy(kv_caches: list[torch.Tensor], src_slots: torch.Tensor,
                  dst_slots: torch.Tensor, deltas: torch.Tensor, inv_freq: torch.Tensor,
                  layers: torch.Tensor | None = None) -> None:
    """In every layer cache of ``kv_caches`` ([2, N, bs, Hk, D] each; one launch for all):
    K and V of flat slots ``src_slots`` ([n] int64) to ``dst_slots`` ([n] int64, disjoint from
    the sources), keys moved by ``deltas`` ([n] int64) positions. ``layers``: their
    ``layer_pointers`` (built here when not given)."""
    if not kv_caches:
        return
    if layers is None:
        layers = layer_pointers(kv_caches)
    cache = kv_caches[0]
    check(layers.shape == (len(kv_caches),) and layers.dtype == torch.int64,
          f"layers must be [{len(kv_caches)}] int64, got {layers.dtype} {tuple(layers.shape)}")
    for name, t in (("src_slots", src_slots), ("dst_slots", dst_slots), ("deltas", deltas)):
        check(t.dim() == 1 and t.shape == src_slots.shape,
              f"{name} must be [n={src_slots.shape[0]}], got {tuple(t.shape)}")
        check_int(name, t, (torch.int64,))
    _check_inv_freq(inv_freq, cache.shape[4])
    check(cache.dtype in _TL_DTYPES, f"unsupported KV dtype {cache.dtype}")
    check_same_device(kv_cache=cache, layers=layers, src_slots=src_slots, dst_slots=dst_slots,
                      deltas=deltas, inv_freq=inv_freq)
    if src_slots.shape[0] == 0:
        return
    hk, half = cache.shape[3], cache.shape[4] // 2
    _rerotate_copy_kernel[(src_slots.shape[0], len(kv_caches))](
        layers, src_slots, dst_slots, deltas, inv_freq,
        cache.stride(0), cache.stride(2), cache.stride(3), hk, half,
        DTYPE=_TL_DTYPES[cache.dtype], FP8_MAX=fp8_max(cache.dtype), BLOCK_HK=next_pow2(hk),
        BLOCK_HALF=next_pow2(half),
    )

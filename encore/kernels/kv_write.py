"""Write the new tokens' K and V into their slots of the paged cache.

    slot_mapping[t] = block * block_size + offset   (-1: padding token, skipped)
    kv_cache[0, block, offset] = k[t];  kv_cache[1, block, offset] = v[t]

One program per token copies all its KV heads (a [BLOCK_H, BLOCK_D] tile). An fp8 cache
(``cache.kv_cache_dtype``) stores k / k_scale and v / v_scale (per-tensor scales of the
layer), saturated to the format's range; the attention kernels multiply the scales back.
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
)


@triton.jit
def _kv_write_kernel(
    k_ptr,  # [T, Hk, D]
    v_ptr,  # [T, Hk, D]
    cache_ptr,  # [2, N, bs, Hk, D]
    slot_ptr,  # [T] int64
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_c2, stride_cb, stride_cs, stride_ch,  # cache strides (int64 math below)
    num_kv_heads, head_dim,
    inv_k_scale, inv_v_scale,
    FP8_MAX: tl.constexpr,  # > 0: an fp8 cache, values scaled and clamped to +-FP8_MAX
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < num_kv_heads) & (d[None, :] < head_dim)
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t64 * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    dst = cache_ptr + block * stride_cb + offset * stride_cs + h[:, None] * stride_ch + d[None, :]
    ty = cache_ptr.dtype.element_ty
    tl.store(dst, fp8_scaled(k, inv_k_scale, FP8_MAX).to(ty), mask=mask)
    tl.store(dst + stride_c2, fp8_scaled(v, inv_v_scale, FP8_MAX).to(ty), mask=mask)


def kv_write(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Store k, v ([T, Hk, D], any float dtype; cast to the cache's) at ``slot_mapping``
    ([T] int64 flat slots, -1 = skip) of ``kv_cache`` ([2, N, bs, Hk, D]). Mutates kv_cache.
    An fp8 cache holds k / k_scale and v / v_scale (saturated); other caches ignore them."""
    check_kv_cache(kv_cache)
    _, num_blocks, block_size, hk, d = kv_cache.shape
    for name, t in (("k", k), ("v", v)):
        check(t.dim() == 3 and t.shape[1:] == (hk, d),
              f"{name} must be [T, {hk}, {d}] to match kv_cache, got {tuple(t.shape)}")
        check_float(name, t)
        check_last_contiguous(name, t)
    check(k.shape[0] == v.shape[0] == slot_mapping.shape[0] and slot_mapping.dim() == 1,
          f"k, v and slot_mapping disagree on T: {k.shape[0]}, {v.shape[0]}, "
          f"{tuple(slot_mapping.shape)}")
    check_int("slot_mapping", slot_mapping, (torch.int64, torch.int32))
    check_same_device(kv_cache=kv_cache, k=k, v=v, slot_mapping=slot_mapping)
    if k.shape[0] == 0:
        return
    _kv_write_kernel[(k.shape[0],)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        hk, d, 1.0 / k_scale, 1.0 / v_scale, FP8_MAX=fp8_max(kv_cache.dtype),
        BLOCK_SIZE=block_size, BLOCK_H=next_pow2(hk), BLOCK_D=next_pow2(d),
    )

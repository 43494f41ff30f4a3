"""The lower tiers' KV codec (``worker/tiers/codec.py``) fused with the block copies, on CUDA.

The torch codec gathers a layer group's blocks into a new tensor, then encodes it in about
twenty passes with fp32 temporaries (and decodes in ten, then scatters): on the tier copies'
side stream those kernels compete with the forward pass for the SMs and made an int8 host
load slower than an uncompressed one. Here one launch per layer group does each direction:

    gather_encode:   cache blocks ``ids`` of layers ``ptrs``  ->  payload [n, G, layer_bytes]
    decode_scatter:  payload [n, G, layer_bytes]  ->  cache blocks ``ids`` of layers ``ptrs``

one program per (block, layer, K or V), reading each element once and writing its code (or
its value) once. The payload's bytes are the torch codec's (its layout, its fp16 parameters
rounded outward, its IEEE division and unfused multiply-add: ``enable_fp_fusion=False``), so
either side decodes the other's blocks; codes may differ where a quotient ties at .5 (here
rounded half up, torch half to even), within the same error bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from encore.kernels._common import check, check_int, check_kv_cache, fp8_max
from encore.kernels.rope import _TL_DTYPES

_F16_MAX = 65504.0
_F16_TINY = 2.0**-24


@triton.jit
def _down16(lo):
    """fp16 nearest to ``lo`` (fp32), stepped down one ulp when above it: <= lo."""
    z = lo.to(tl.float16)
    bits = z.to(tl.int16, bitcast=True)
    down = tl.where(z > 0, bits - 1, tl.where(z < 0, bits + 1, -32767))  # 0 -> -2^-24
    return tl.where(z.to(tl.float32) > lo, down.to(tl.int16).to(tl.float16, bitcast=True), z)


@triton.jit
def _params(lo, hi, QMAX: tl.constexpr):
    """The torch codec's ``_params``: fp16 (zero, scale) whose grid covers [lo, hi]."""
    lo = tl.clamp(lo, -65504.0, 65504.0)
    hi = tl.clamp(hi, -65504.0, 65504.0)
    zero = _down16(lo)
    z = zero.to(tl.float32)
    scale = tl.math.div_rn(hi - z, QMAX * 1.0).to(tl.float16).to(tl.float32)
    scale = tl.maximum(scale, 5.960464477539063e-08).to(tl.float16)  # >= 2^-24 (fp16's least)
    short = z + scale.to(tl.float32) * QMAX < hi
    up = (scale.to(tl.int16, bitcast=True) + 1).to(tl.int16).to(tl.float16, bitcast=True)
    return zero, tl.where(short, up, scale)


@triton.jit
def _codes(x, zero, scale, QMAX: tl.constexpr):
    q = tl.floor(tl.math.div_rn(x - zero.to(tl.float32), scale.to(tl.float32)) + 0.5)
    return tl.clamp(q, 0.0, QMAX * 1.0).to(tl.uint8)


@triton.jit
def _program_block(layers_ptr, ids_ptr, bytes_ptr, bytes16_ptr, stride_c2, stride_n,
                   num_layers, layer_bytes, codes_bytes, DTYPE: tl.constexpr):
    """This program's (block j, layer g, K or V) part of both directions: which half (0:
    keys, 1: values), its elements in the cache, its codes in the payload, and the layer's
    fp16 parameters (K zero, scale [2, H*D]; V zero, scale [2, bs*H])."""
    j = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    half = tl.program_id(2)
    cache = tl.load(layers_ptr + g).to(tl.pointer_type(DTYPE))
    kv = cache + half * stride_c2 + tl.load(ids_ptr + j).to(tl.int64) * stride_n
    base = (j * num_layers + g) * layer_bytes
    codes = bytes_ptr + base + half * codes_bytes
    params = bytes16_ptr + (base + 2 * codes_bytes) // 2
    return half, kv, codes, params


@triton.jit
def _gather_encode_kernel(
    layers_ptr,  # [G] int64: the group's cache addresses ([2, N, bs, H, D] each)
    ids_ptr,  # [n] int64 device blocks
    out_ptr,  # [n, G, layer_bytes] uint8
    out16_ptr,  # the same bytes as fp16 (parameters)
    stride_c2, stride_n, num_layers, layer_bytes, codes_bytes,
    BS: tl.constexpr, HEADS: tl.constexpr, DIM: tl.constexpr, BITS: tl.constexpr,
    DTYPE: tl.constexpr, CH: tl.constexpr, ROWS: tl.constexpr,
):
    QMAX: tl.constexpr = (1 << BITS) - 1
    HD: tl.constexpr = HEADS * DIM
    half, src, codes, params = _program_block(layers_ptr, ids_ptr, out_ptr, out16_ptr, stride_c2,
                                              stride_n, num_layers, layer_bytes, codes_bytes,
                                              DTYPE)
    if half == 0:  # keys: per channel (h, d) over the block's tokens
        t = tl.arange(0, BS)
        for c0 in range(0, HD, CH):
            if BITS == 8:
                ch = c0 + tl.arange(0, CH)
                x = tl.load(src + t[:, None] * HD + ch[None, :]).to(tl.float32)
                zero, scale = _params(tl.min(x, 0), tl.max(x, 0), QMAX)
                tl.store(codes + t[:, None] * HD + ch[None, :],
                         _codes(x, zero[None, :], scale[None, :], QMAX))
                tl.store(params + ch, zero)
                tl.store(params + HD + ch, scale)
            else:  # int4: even channel in the low nibble
                ch = c0 + 2 * tl.arange(0, CH // 2)
                xe = tl.load(src + t[:, None] * HD + ch[None, :]).to(tl.float32)
                xo = tl.load(src + t[:, None] * HD + ch[None, :] + 1).to(tl.float32)
                ze, se = _params(tl.min(xe, 0), tl.max(xe, 0), QMAX)
                zo, so = _params(tl.min(xo, 0), tl.max(xo, 0), QMAX)
                q = _codes(xe, ze[None, :], se[None, :], QMAX) | (
                    _codes(xo, zo[None, :], so[None, :], QMAX) << 4)
                tl.store(codes + (t[:, None] * HD + ch[None, :]) // 2, q)
                tl.store(params + ch, ze)
                tl.store(params + ch + 1, zo)
                tl.store(params + HD + ch, se)
                tl.store(params + HD + ch + 1, so)
    else:  # values: per (token, head) over head_dim
        vparams = params + 2 * HD
        for r0 in range(0, BS * HEADS, ROWS):
            r = r0 + tl.arange(0, ROWS)
            if BITS == 8:
                d = tl.arange(0, DIM)
                x = tl.load(src + r[:, None] * DIM + d[None, :]).to(tl.float32)
                zero, scale = _params(tl.min(x, 1), tl.max(x, 1), QMAX)
                tl.store(codes + r[:, None] * DIM + d[None, :],
                         _codes(x, zero[:, None], scale[:, None], QMAX))
            else:
                d = 2 * tl.arange(0, DIM // 2)
                xe = tl.load(src + r[:, None] * DIM + d[None, :]).to(tl.float32)
                xo = tl.load(src + r[:, None] * DIM + d[None, :] + 1).to(tl.float32)
                zero, scale = _params(tl.minimum(tl.min(xe, 1), tl.min(xo, 1)),
                                      tl.maximum(tl.max(xe, 1), tl.max(xo, 1)), QMAX)
                q = _codes(xe, zero[:, None], scale[:, None], QMAX) | (
                    _codes(xo, zero[:, None], scale[:, None], QMAX) << 4)
                tl.store(codes + (r[:, None] * DIM + d[None, :]) // 2, q)
            tl.store(vparams + r, zero)
            tl.store(vparams + BS * HEADS + r, scale)


@triton.jit
def _decode_scatter_kernel(
    layers_ptr,  # [G] int64: the group's cache addresses ([2, N, bs, H, D] each)
    ids_ptr,  # [n] int64 device blocks
    in_ptr,  # [n, G, layer_bytes] uint8
    in16_ptr,  # the same bytes as fp16 (parameters)
    stride_c2, stride_n, num_layers, layer_bytes, codes_bytes,
    BS: tl.constexpr, HEADS: tl.constexpr, DIM: tl.constexpr, BITS: tl.constexpr,
    DTYPE: tl.constexpr, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr,
):
    HD: tl.constexpr = HEADS * DIM
    half, dst, codes, params = _program_block(layers_ptr, ids_ptr, in_ptr, in16_ptr, stride_c2,
                                              stride_n, num_layers, layer_bytes, codes_bytes,
                                              DTYPE)
    for e0 in range(0, BS * HD, BLOCK):
        e = e0 + tl.arange(0, BLOCK)
        if BITS == 8:
            q = tl.load(codes + e).to(tl.float32)
        else:
            q = ((tl.load(codes + e // 2) >> ((e & 1) * 4).to(tl.uint8)) & 0xF).to(tl.float32)
        if half == 0:  # keys: per channel
            p = params + e % HD
            zero = tl.load(p)
            scale = tl.load(p + HD)
        else:  # values: per (token, head)
            p = params + 2 * HD + e // DIM
            zero = tl.load(p)
            scale = tl.load(p + BS * HEADS)
        x = q * scale.to(tl.float32) + zero.to(tl.float32)  # unfused: as the torch codec
        if FP8_MAX > 0:
            x = tl.clamp(x, -FP8_MAX, FP8_MAX)
        tl.store(dst + e, x.to(DTYPE))


def _layer_bytes(bs: int, heads: int, dim: int, bits: int) -> tuple[int, int]:
    """(bytes of a layer's K codes, bytes of a layer's whole payload), as the torch codec."""
    codes = bs * heads * dim * bits // 8
    return codes, 2 * codes + 4 * heads * dim + 4 * bs * heads


def _launch_args(caches: list[torch.Tensor], ptrs: torch.Tensor, ids: torch.Tensor,
                 payload: torch.Tensor, bits: int) -> tuple[tuple, dict]:
    """Both directions' arguments checked; the kernels' shared arguments (positional,
    constexpr)."""
    check(bits in (4, 8), f"bits must be 4 or 8, got {bits}")
    check(len(caches) > 0, "no layers")
    first = caches[0]
    for c in caches:
        check_kv_cache(c)
        check(c.shape == first.shape and c.stride() == first.stride() and c.dtype == first.dtype,
              "every layer's KV cache must have the same shape, strides and dtype")
    _, _, bs, heads, dim = first.shape
    check(first.stride(3) == dim and first.stride(2) == heads * dim,
          f"a cache block must be contiguous [bs, heads, dim], strides {first.stride()}")
    for name, size in (("bs", bs), ("heads", heads), ("dim", dim)):
        check(size >= 2 and size & (size - 1) == 0, f"{name} must be a power of two, got {size}")
    check(first.dtype in _TL_DTYPES, f"unsupported KV dtype {first.dtype}")
    check(ptrs.shape == (len(caches),) and ptrs.dtype == torch.int64,
          f"ptrs must be [{len(caches)}] int64 (layer_pointers), got {tuple(ptrs.shape)}")
    check_int("ids", ids, (torch.int64,))
    check(ids.dim() == 1, f"ids must be [n], got {tuple(ids.shape)}")
    codes, layer_bytes = _layer_bytes(bs, heads, dim, bits)
    shape = (ids.shape[0], len(caches), layer_bytes)
    check(payload.dtype == torch.uint8 and tuple(payload.shape) == shape
          and payload.is_contiguous(),
          f"payload must be contiguous uint8 {shape}, got {payload.dtype} {tuple(payload.shape)}")
    devices = {t.device for t in (first, ptrs, ids, payload)}
    check(len(devices) == 1, f"tensors on different devices: {devices}")
    args = (ptrs, ids, payload, payload.view(torch.float16), first.stride(0), first.stride(1),
            len(caches), layer_bytes, codes)
    meta = dict(BS=bs, HEADS=heads, DIM=dim, BITS=bits, DTYPE=_TL_DTYPES[first.dtype],
                enable_fp_fusion=False)
    return args, meta


def gather_encode(caches: list[torch.Tensor], ptrs: torch.Tensor, ids: torch.Tensor,
                  bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks ``ids`` ([n] int64) of the layer caches ``caches`` (their ``layer_pointers``
    ``ptrs``) encoded as the torch codec's payload ``[n, len(caches), layer_bytes]`` uint8."""
    _, _, bs, heads, dim = caches[0].shape
    if out is None:
        out = torch.empty((ids.shape[0], len(caches), _layer_bytes(bs, heads, dim, bits)[1]),
                          dtype=torch.uint8, device=caches[0].device)
    args, meta = _launch_args(caches, ptrs, ids, out, bits)
    if ids.shape[0]:
        _gather_encode_kernel[(ids.shape[0], len(caches), 2)](
            *args, CH=min(heads * dim, 256 if bits == 8 else 512), ROWS=min(bs * heads, 32),
            **meta)
    return out


def decode_scatter(payload: torch.Tensor, caches: list[torch.Tensor], ptrs: torch.Tensor,
                   ids: torch.Tensor, bits: int) -> None:
    """Payload ``[n, len(caches), layer_bytes]`` (the torch codec's) decoded into blocks
    ``ids`` ([n] int64) of the layer caches ``caches`` (``ptrs``: their ``layer_pointers``).
    An fp8 cache gets the decoded values saturated to its format."""
    args, meta = _launch_args(caches, ptrs, ids, payload, bits)
    if ids.shape[0]:
        _decode_scatter_kernel[(ids.shape[0], len(caches), 2)](
            *args, FP8_MAX=fp8_max(caches[0].dtype),
            BLOCK=min(meta["BS"] * meta["HEADS"] * meta["DIM"], 2048), **meta)

"""One-row linear layer (batch-1 decode): y [1, N] = x [1, K] @ W[N, K]^T (+ bias), no split-K,
with the small ops around a decoder layer's linears folded in (each flag is optional):

    NORM       y = (x @ W^T) * rsqrt(mean(x^2) + eps), x scaled by the RMSNorm weight as loaded
    SWIGLU     W = [gate | up] (2N rows): y = silu(x @ gate^T) * (x @ up^T)
    RESIDUAL   out is the residual stream r, updated in place: r += round(y)

Each program owns BLOCK_N rows of W (and, SWIGLU, the same rows of up) and walks K in BLOCK_K
steps, keeping a [BLOCK_N, BLOCK_K] fp32 partial product in registers and reducing it once at
the end:

    W rows [pid*BLOCK_N, +BLOCK_N)  x  x[k0 : k0+BLOCK_K]  ->  acc  ->  sum over K  ->  y

Reading W is the whole cost (x is reused from cache), so the tile shape is autotuned per
(N, K) for memory-level parallelism. cuBLAS splits K for narrow outputs and pays a second
reduce kernel; here the N rows alone give enough programs (N / BLOCK_N >= 2 per SM).

The folds cost no second pass: RMSNorm's scale is one scalar per row, so every program
accumulates sum(x^2) over the same x tiles it multiplies and scales its dot products at the
end (the norm's weight multiplies x as it is loaded). The residual add moves to the linear
before the norm (o_proj, down_proj), whose output rows each belong to one program: the add
is in place. A batch-1 decoder layer is then qkv+norm, RoPE+KV write, attention, o_proj+add,
gate_up+norm+SiLU, down+add: three launches fewer than add+norm, qkv, ..., SiLU x up, down.
The rounding differs from the separate kernels' (the normalized x is never rounded to the
model dtype); the residual stream is rounded as the separate add rounds it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from encore.kernels._common import check, check_float, pdl_gate, pdl_launch

_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(4, 1024, 4, 3), (8, 512, 4, 3), (8, 1024, 8, 3), (16, 256, 4, 4),
                         (16, 512, 8, 3), (2, 2048, 8, 3), (4, 512, 4, 4)]
]


@triton.jit
def _gemv_tile(acc, acc_up, sq, x_ptr, nw_ptr, w, u, c, cmask,
               NORM: tl.constexpr, SWIGLU: tl.constexpr):
    """Multiply-accumulate one K tile: x[c] (normed: scaled by nw[c], its squares summed)."""
    x = tl.load(x_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if NORM:
        sq += x * x
        x = x * tl.load(nw_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    acc += w.to(tl.float32) * x[None, :]
    if SWIGLU:
        acc_up += u.to(tl.float32) * x[None, :]
    return acc, acc_up, sq


@triton.jit
def _gemv_body(x_ptr, w_ptr, b_ptr, nw_ptr, out_ptr, N, K, stride_w, eps,
               HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
               RESIDUAL: tl.constexpr, PDL: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    up_rows = w_ptr + (rows + N).to(tl.int64)[:, None] * stride_w  # SWIGLU only
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # SWIGLU only
    sq = tl.zeros((BLOCK_K,), dtype=tl.float32)  # NORM only
    # The first W tile is loaded before anything the previous kernel wrote is read: under a
    # programmatic dependent launch (PDL, ``pdl_gate``) it streams while that kernel ends.
    cmask = cols < K
    wmask = rmask[:, None] & cmask[None, :]
    w = tl.load(w_rows + cols[None, :], mask=wmask, other=0.0)
    u = w
    if SWIGLU:
        u = tl.load(up_rows + cols[None, :], mask=wmask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    pdl_gate(PDL)
    if RESIDUAL:  # loaded now, in flight during the K loop, not after it
        r = tl.load(out_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    acc, acc_up, sq = _gemv_tile(acc, acc_up, sq, x_ptr, nw_ptr, w, u, cols, cmask, NORM, SWIGLU)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        c = k0 + cols
        cmask = c < K
        wmask = rmask[:, None] & cmask[None, :]
        w = tl.load(w_rows + c[None, :], mask=wmask, other=0.0)
        if SWIGLU:
            u = tl.load(up_rows + c[None, :], mask=wmask, other=0.0)
        acc, acc_up, sq = _gemv_tile(acc, acc_up, sq, x_ptr, nw_ptr, w, u, c, cmask, NORM,
                                     SWIGLU)
    y = tl.sum(acc, 1)
    if NORM:
        rstd = tl.rsqrt(tl.sum(sq, 0) / K + eps)
        y = y * rstd
    if HAS_BIAS:
        y += bias
    if SWIGLU:
        up = tl.sum(acc_up, 1)
        if NORM:
            up = up * rstd
        y = y / (1.0 + tl.exp(-y)) * up
    if RESIDUAL:  # as the separate add: round y, add in fp32, round the sum
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32) + r
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _gemv_kernel_fixed(x_ptr,  # [K]
                       w_ptr,  # [N, K] ([2N, K]: SWIGLU), row stride stride_w
                       b_ptr,  # [N] (HAS_BIAS)
                       nw_ptr,  # [K] (NORM)
                       out_ptr,  # [N]; the residual, read and written (RESIDUAL)
                       N, K, stride_w, eps,
                       HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
                       RESIDUAL: tl.constexpr, PDL: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _gemv_body(x_ptr, w_ptr, b_ptr, nw_ptr, out_ptr, N, K, stride_w, eps, HAS_BIAS, NORM,
               SWIGLU, RESIDUAL, PDL, BLOCK_N, BLOCK_K)


@triton.autotune(configs=_CONFIGS, key=["N", "K", "HAS_BIAS", "NORM", "SWIGLU", "RESIDUAL", "PDL"],
                 restore_value=["out_ptr"])
@triton.jit
def _gemv_kernel_tuned(x_ptr, w_ptr, b_ptr, nw_ptr, out_ptr, N, K, stride_w, eps,
                       HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
                       RESIDUAL: tl.constexpr, PDL: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _gemv_body(x_ptr, w_ptr, b_ptr, nw_ptr, out_ptr, N, K, stride_w, eps, HAS_BIAS, NORM,
               SWIGLU, RESIDUAL, PDL, BLOCK_N, BLOCK_K)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None, *, norm_weight: torch.Tensor | None = None,
         eps: float = 1e-6, swiglu: bool = False,
         residual: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """x [1, K] (contiguous), weight [N, K] (last dim contiguous), bias [N] -> [1, N] in x's
    dtype (``out`` if given, which may be float32: logits). fp32 accumulation. On CUDA the
    tile is autotuned per (N, K) and fold at the first call of a shape (run that call outside
    CUDA graph capture).

    ``norm_weight`` [K]: the linear of RMSNorm(x) * norm_weight (``eps`` inside the root).
    ``swiglu``: weight is [gate | up] (2N rows); the result is silu(gate) * up [1, N].
    ``residual`` [1, N]: the result is added into it, in place, and it is returned.
    ``pdl``: on Hopper or newer, launch as a programmatic dependent (``pdl_launch``): the
    first W tile loads while the kernel before it ends, so that kernel must not write
    ``weight`` (model weights: never).
    """
    check(x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous(),
          f"x must be one contiguous row [1, K], got {tuple(x.shape)} strides {x.stride()}")
    rows, k = weight.shape
    check(x.shape[1] == k, f"x [1, {x.shape[1]}] does not match weight [{rows}, {k}]")
    check(weight.stride(1) == 1, f"weight must be contiguous in K, strides {weight.stride()}")
    check(weight.dtype == x.dtype, f"weight dtype {weight.dtype} != x dtype {x.dtype}")
    check_float("x", x)
    check(not swiglu or rows % 2 == 0, f"swiglu needs [gate | up] rows, got {rows}")
    n = rows // 2 if swiglu else rows
    if bias is not None:
        check(not swiglu, "swiglu with a bias is not supported")
        check(bias.shape == (n,) and bias.is_contiguous(), f"bias must be [{n}]")
    if norm_weight is not None:
        check(norm_weight.shape == (k,) and norm_weight.is_contiguous(),
              f"norm_weight must be [{k}], got {tuple(norm_weight.shape)}")
    if residual is not None:
        check(out is None, "residual is the output: pass one of out and residual")
        out = residual
    if out is None:
        out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    dtypes = (x.dtype,) if residual is not None else (x.dtype, torch.float32)
    check(out.shape == (1, n) and out.dtype in dtypes and out.is_contiguous(),
          f"out must be contiguous [1, {n}] in {x.dtype} (or float32, not with residual), "
          f"got {out.dtype} {tuple(out.shape)}")
    b = bias if bias is not None else out
    nw = norm_weight if norm_weight is not None else out
    flags = dict(HAS_BIAS=bias is not None, NORM=norm_weight is not None, SWIGLU=swiglu,
                 RESIDUAL=residual is not None)
    if x.device.type == "cuda":
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _gemv_kernel_tuned[grid](x, weight, b, nw, out, n, k, weight.stride(0), eps, **flags,
                                 **pdl_launch(x.device, pdl))
    else:  # the interpreter: one small fixed tile
        _gemv_kernel_fixed[(triton.cdiv(n, 4),)](x, weight, b, nw, out, n, k, weight.stride(0),
                                                 eps, **flags, PDL=False, BLOCK_N=4,
                                                 BLOCK_K=64)
    return out

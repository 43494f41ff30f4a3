"""One-row linear layer (batch-1 decode): y [1, N] = x [1, K] @ W[N, K]^T (+ bias), no split-K.

Each program owns BLOCK_N rows of W and walks K in BLOCK_K steps, keeping a
[BLOCK_N, BLOCK_K] fp32 partial product in registers and reducing it once at the end:

    W rows [pid*BLOCK_N, +BLOCK_N)  x  x[k0 : k0+BLOCK_K]  ->  acc  ->  sum over K  ->  y

Reading W is the whole cost (x is reused from cache), so the tile shape is autotuned per
(N, K) for memory-level parallelism. cuBLAS splits K for narrow outputs and pays a second
reduce kernel; here the N rows alone give enough programs (N / BLOCK_N >= 2 per SM).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from encore.kernels._common import check, check_float

_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(4, 1024, 4, 3), (8, 512, 4, 3), (8, 1024, 8, 3), (16, 256, 4, 4),
                         (16, 512, 8, 3), (2, 2048, 8, 3), (4, 512, 4, 4)]
]


@triton.jit
def _gemv_body(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_w,
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c = k0 + cols
        cmask = c < K
        x = tl.load(x_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + c[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _gemv_kernel_fixed(x_ptr,  # [K]
                       w_ptr,  # [N, K], row stride stride_w
                       b_ptr,  # [N] (HAS_BIAS)
                       out_ptr,  # [N]
                       N, K, stride_w,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _gemv_body(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_w, HAS_BIAS, BLOCK_N, BLOCK_K)


@triton.autotune(configs=_CONFIGS, key=["N", "K"])
@triton.jit
def _gemv_kernel_tuned(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_w,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _gemv_body(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_w, HAS_BIAS, BLOCK_N, BLOCK_K)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] (contiguous), weight [N, K] (last dim contiguous), bias [N] -> [1, N] in x's
    dtype (``out`` if given). fp32 accumulation. On CUDA the tile is autotuned per (N, K) at
    the first call of a shape (run that call outside CUDA graph capture)."""
    check(x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous(),
          f"x must be one contiguous row [1, K], got {tuple(x.shape)} strides {x.stride()}")
    n, k = weight.shape
    check(x.shape[1] == k, f"x [1, {x.shape[1]}] does not match weight [{n}, {k}]")
    check(weight.stride(1) == 1, f"weight must be contiguous in K, strides {weight.stride()}")
    check(weight.dtype == x.dtype, f"weight dtype {weight.dtype} != x dtype {x.dtype}")
    check_float("x", x)
    if bias is not None:
        check(bias.shape == (n,) and bias.is_contiguous(), f"bias must be [{n}]")
    if out is None:
        out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    check(out.shape == (1, n) and out.dtype == x.dtype and out.is_contiguous(),
          f"out must be contiguous {x.dtype} [1, {n}], got {out.dtype} {tuple(out.shape)}")
    b = bias if bias is not None else out
    if x.device.type == "cuda":
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _gemv_kernel_tuned[grid](x, weight, b, out, n, k, weight.stride(0),
                                 HAS_BIAS=bias is not None)
    else:  # the interpreter: one small fixed tile
        _gemv_kernel_fixed[(triton.cdiv(n, 4),)](x, weight, b, out, n, k, weight.stride(0),
                                                 HAS_BIAS=bias is not None, BLOCK_N=4,
                                                 BLOCK_K=64)
    return out

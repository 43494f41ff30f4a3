"""Many-row gate_up projection with SiLU x up in its epilogue (prefill, mixed steps):

    x [M, K] @ [gate | up]^T, weight [2I, K]  ->  out [M, I] = silu(x @ gate^T) * (x @ up^T)

The separate path is a cuBLAS GEMM writing gate_up [M, 2I] and ``silu_mul`` reading it back
(``kernels/activation.py``): at a 4k-token prefill of Llama-3-8B that is 235 MB written, read
and 117 MB written again per layer, ~0.15 ms of a ~1.5 ms MLP. Here each program owns
BLOCK_M rows x BLOCK_N output columns and multiplies them against BLOCK_N gate rows and the
same BLOCK_N up rows in one [BLOCK_M, 2 BLOCK_N] tensor-core accumulator, so the activation
is applied before anything is stored:

    W rows  [n0, n0+BN) ++ [I+n0, I+n0+BN)   (one [BK, 2 BN] tile per K step)
    acc [BM, 2 BN]  ->  gate [BM, BN], up [BM, BN]  ->  silu(gate) * up  ->  out [BM, BN]

gate and up are rounded to the model dtype before the activation, as the separate path
rounds them (cuBLAS writes bf16), so the two differ only in accumulation order. Programs are
visited in GROUP_M row groups (the weight tiles of a group stay in L2). Whether this beats
cuBLAS + ``silu_mul`` depends on the card and the row count: ``TritonOps`` times both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from encore.kernels._common import check, check_float, dot_upcast

_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                  num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4),
                             (128, 64, 64, 8, 4), (64, 128, 64, 4, 4), (128, 128, 32, 8, 4),
                             (64, 64, 64, 4, 4), (256, 64, 64, 8, 3)]
]


@triton.jit
def _swiglu_gemm_body(x_ptr, w_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_o,
                      UPCAST: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.arange(0, 2 * BLOCK_N)
    cols = pid_n * BLOCK_N + j % BLOCK_N  # output column of accumulator column j
    w_rows = cols + (j // BLOCK_N) * N  # gate row for j < BLOCK_N, then the up row
    rk = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + rk[None, :]
    w_ptrs = w_ptr + w_rows[None, :].to(tl.int64) * stride_w + rk[:, None]  # [BK, 2 BN]
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = rk + k0 < K
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    dtype = out_ptr.dtype.element_ty
    gate = gate.to(dtype).to(tl.float32)  # rounded as the separate GEMM's output is
    up = up.to(dtype).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    out_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_o + out_cols[None, :]
    tl.store(o_ptrs, y.to(dtype), mask=row_ok[:, None] & (out_cols < N)[None, :])


@triton.jit
def _swiglu_gemm_fixed(x_ptr, w_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_o,
                       UPCAST: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    _swiglu_gemm_body(x_ptr, w_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_o, UPCAST,
                      EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K"])
@triton.jit
def _swiglu_gemm_tuned(x_ptr, w_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_o, M_BUCKET,
                       UPCAST: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    _swiglu_gemm_body(x_ptr, w_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_o, UPCAST,
                      EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


def m_bucket(m: int) -> int:
    """The row count's autotuning bucket: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(m))


def swiglu_gemm(x: torch.Tensor, weight: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) for x [M, K] (last dim contiguous) and weight
    [gate | up] [2I, K] (last dim contiguous, x's dtype) -> [M, I] in x's dtype (``out`` if
    given, contiguous). fp32 accumulation; on CUDA the tile is autotuned per row-count bucket
    (power of two) and weight shape at its first call (run that outside graph capture)."""
    check(x.dim() == 2 and weight.dim() == 2, f"x must be [M, K] and weight [2I, K], got "
          f"{tuple(x.shape)} and {tuple(weight.shape)}")
    check_float("x", x)
    m, k = x.shape
    rows = weight.shape[0]
    check(weight.shape[1] == k and rows % 2 == 0,
          f"weight must be [gate | up] [2I, {k}], got {tuple(weight.shape)}")
    check(weight.dtype == x.dtype, f"weight dtype {weight.dtype} != x dtype {x.dtype}")
    check(x.stride(1) == 1 and weight.stride(1) == 1,
          f"x and weight must be contiguous in K, strides {x.stride()} and {weight.stride()}")
    check(x.device == weight.device, f"x on {x.device}, weight on {weight.device}")
    n = rows // 2
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    check(out.shape == (m, n) and out.dtype == x.dtype and out.is_contiguous()
          and out.device == x.device,
          f"out must be contiguous {x.dtype} [{m}, {n}] on {x.device}, got {out.dtype} "
          f"{tuple(out.shape)} on {out.device}")
    if m == 0:
        return out
    args = (x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0))
    if x.device.type == "cuda":
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _swiglu_gemm_tuned[grid](*args, m_bucket(m), UPCAST=False,
                                 EVEN_K=k % 64 == 0)  # every config's BLOCK_K divides 64
    else:  # the interpreter: one small fixed tile
        bm, bn, bk = 16, 16, 32
        _swiglu_gemm_fixed[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
            *args, UPCAST=dot_upcast(x.device), EVEN_K=k % bk == 0, BLOCK_M=bm, BLOCK_N=bn,
            BLOCK_K=bk, GROUP_M=4)
    return out

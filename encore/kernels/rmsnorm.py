"""Fused RMSNorm with optional residual add (one program per row, one pass in registers).

    with residual:   r = x + residual  (stored back into residual);  y = r / rms(r) * w
    without:         y = x / rms(x) * w               rms(v) = sqrt(mean(v^2) + eps)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from encore.kernels._common import (
    check,
    check_float,
    check_last_contiguous,
    check_same_device,
    pdl_gate,
    pdl_launch,
)


@triton.jit
def _rmsnorm_kernel(
    x_ptr,  # [R, H]
    res_ptr,  # [R, H] (HAS_RESIDUAL), updated in place
    w_ptr,  # [H]
    out_ptr,  # [R, H]
    stride_x, stride_r, stride_o,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # programmatic dependent launch (``pdl_launch``)
):
    pdl_gate(PDL)
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    mask = i < hidden
    x = tl.load(x_ptr + row * stride_x + i, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = res_ptr + row * stride_r + i
        r = x + tl.load(res, mask=mask, other=0.0).to(tl.float32)
        r_ty = r.to(res_ptr.dtype.element_ty)
        tl.store(res, r_ty, mask=mask)
        x = r_ty.to(tl.float32)  # normalize what was stored, as the twin does
    rstd = tl.rsqrt(tl.sum(x * x, 0) / hidden + eps)
    w = tl.load(w_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + i, (x * rstd * w).to(out_ptr.dtype.element_ty),
             mask=mask)


def _rows(name: str, t: torch.Tensor) -> torch.Tensor:
    check_float(name, t)
    check_last_contiguous(name, t)
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(t.shape)} and strides {t.stride()} "
                         f"cannot be viewed as rows [R, H]") from None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm of x [..., H] with weight [H]; returns (y, residual).

    With ``residual`` (same shape as x) the sum x + residual is written into ``residual``
    (mutated) and normalized; without, the second value is None. y is ``out`` (contiguous,
    x's shape and dtype) or a new tensor.
    """
    hidden = x.shape[-1]
    check(weight.shape == (hidden,), f"weight must be [{hidden}], got {tuple(weight.shape)}")
    check_float("weight", weight)
    x2 = _rows("x", x)
    r2 = x2
    if residual is not None:
        check(residual.shape == x.shape, f"residual {tuple(residual.shape)} != x "
              f"{tuple(x.shape)}")
        r2 = _rows("residual", residual)
        check_same_device(x=x, residual=residual)
    check_same_device(x=x, weight=weight)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    check(out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous(),
          f"out must be contiguous {x.dtype} {tuple(x.shape)}, got {out.dtype} "
          f"{tuple(out.shape)}")
    o2 = out.view(-1, hidden)
    if x2.shape[0] == 0:
        return out, residual
    _rmsnorm_kernel[(x2.shape[0],)](
        x2, r2, weight, o2, x2.stride(0), r2.stride(0), o2.stride(0), hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
        num_warps=8 if hidden >= 4096 else 4, **pdl_launch(x.device),
    )
    return out, residual

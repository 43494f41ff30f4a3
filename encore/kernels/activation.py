"""SwiGLU activation: ``silu(gate) * up`` of a fused gate_up projection, one pass.

    gate_up [T, 2I] = [gate | up]  ->  out [T, I],  out = gate * sigmoid(gate) * up

fp32 math, one rounding at the store (torch's ``F.silu(gate) * up`` rounds twice in bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from encore.kernels._common import check, check_float, check_last_contiguous

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(
    x_ptr,  # [T, 2I]: gate in [0, I), up in [I, 2I)
    out_ptr,  # [T, I]
    stride_x, stride_o, inter,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = i < inter
    gate = tl.load(x_ptr + row * stride_x + i, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + i, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + i, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` of gate_up [T, 2I] (last dim contiguous) -> out [T, I] (contiguous,
    gate_up's dtype; a new tensor unless given)."""
    check(gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0,
          f"gate_up must be [T, 2I], got {tuple(gate_up.shape)}")
    check_float("gate_up", gate_up)
    check_last_contiguous("gate_up", gate_up)
    t, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if out is None:
        out = torch.empty(t, inter, dtype=gate_up.dtype, device=gate_up.device)
    check(out.shape == (t, inter) and out.dtype == gate_up.dtype and out.is_contiguous()
          and out.device == gate_up.device,
          f"out must be contiguous {gate_up.dtype} [{t}, {inter}] on {gate_up.device}, got "
          f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if t == 0:
        return out
    _silu_mul_kernel[(t, triton.cdiv(inter, BLOCK))](
        gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=BLOCK, num_warps=4,
    )
    return out

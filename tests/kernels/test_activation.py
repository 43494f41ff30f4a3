"""Fused SiLU x up (SwiGLU) against its torch twin, alone and in the gate_up GEMM's epilogue."""

from __future__ import annotations

import pytest
import torch

from encore.kernels import reference as R
from encore.kernels.activation import silu_mul
from encore.kernels.gemm import swiglu_gemm
from tests.kernels.conftest import DEVICE, TOL, rel_err


@pytest.mark.parametrize("inter", [64, 100, 1536])  # one block, ragged, several blocks
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(inter, rows, dtype):
    x = (2 * torch.randn(rows, 2 * inter, device=DEVICE)).to(dtype)
    out = torch.full((rows, inter), float("nan"), dtype=dtype, device=DEVICE)  # poison
    y = silu_mul(x, out=out)
    assert y is out and y.shape == (rows, inter)
    assert rel_err(y, R.silu_mul(x.cpu())) < TOL[dtype]


def test_silu_mul_strided_rows_and_bad_args():
    """A row-strided view (a slice of a wider buffer) works; bad shapes are ValueError."""
    wide = torch.randn(3, 40, device=DEVICE)
    x = wide[:, :32]
    assert rel_err(silu_mul(x), R.silu_mul(x.cpu())) < TOL[torch.float32]
    with pytest.raises(ValueError, match="gate_up"):
        silu_mul(torch.randn(3, 7, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        silu_mul(x, out=torch.empty(3, 15, device=DEVICE))
    assert silu_mul(torch.randn(0, 8, device=DEVICE)).shape == (0, 4)


def _swiglu_twin(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The separate path: the GEMM rounded to the model dtype, then silu(gate) * up."""
    return R.silu_mul((x.double() @ weight.double().t()).to(x.dtype).cpu())


# Triton's interpreter converts fp32 to bf16 toward zero, not to nearest; the epilogue rounds
# gate and up and then the product, so on the CPU the error bound doubles.
GEMM_TOL = {**TOL, torch.bfloat16: TOL[torch.bfloat16] * (1 if DEVICE == "cuda" else 2)}


@pytest.mark.parametrize("rows", [1, 19, 40])  # one row, ragged row tiles, several
@pytest.mark.parametrize("inter,k", [(32, 64), (40, 96), (24, 50)])  # even / ragged N and K
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_gemm(rows, inter, k, dtype):
    x = torch.randn(rows, k, device=DEVICE).to(dtype)
    weight = (torch.randn(2 * inter, k, device=DEVICE) / k**0.5).to(dtype)
    out = torch.full((rows, inter), float("nan"), dtype=dtype, device=DEVICE)  # poison
    y = swiglu_gemm(x, weight, out=out)
    assert y is out and y.shape == (rows, inter)
    assert rel_err(y, _swiglu_twin(x, weight)) < GEMM_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 300, 4096])
def test_swiglu_gemm_llama_shape(rows):
    """Llama-3-8B's gate_up at prefill sizes, the autotuned tiles."""
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(2 * 14336, 4096, device="cuda", dtype=torch.bfloat16) / 64
    assert rel_err(swiglu_gemm(x, weight), _swiglu_twin(x, weight)) < TOL[torch.bfloat16]


def test_swiglu_gemm_strided_rows_and_bad_args():
    """x may be a row-strided view; mismatched shapes, dtypes and outs are ValueError."""
    wide = torch.randn(5, 80, device=DEVICE)
    x, weight = wide[:, :64], torch.randn(32, 64, device=DEVICE)
    assert rel_err(swiglu_gemm(x, weight), _swiglu_twin(x, weight)) < TOL[torch.float32]
    with pytest.raises(ValueError, match="gate"):
        swiglu_gemm(x, torch.randn(31, 64, device=DEVICE))
    with pytest.raises(ValueError, match="gate"):
        swiglu_gemm(x, torch.randn(32, 48, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        swiglu_gemm(x, weight.to(torch.bfloat16))
    with pytest.raises(ValueError, match="out"):
        swiglu_gemm(x, weight, out=torch.empty(5, 15, device=DEVICE))
    assert swiglu_gemm(torch.randn(0, 64, device=DEVICE), weight).shape == (0, 16)

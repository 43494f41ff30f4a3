"""Fused SiLU x up (SwiGLU) against its torch twin."""

from __future__ import annotations

import pytest
import torch

from encore.kernels import reference as R
from encore.kernels.activation import silu_mul
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

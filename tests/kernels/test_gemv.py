"""One-row linear (batch-1 decode GEMV) against its torch twin."""

from __future__ import annotations

import pytest
import torch

from encore.kernels import reference as R
from encore.kernels.gemv import gemv
from tests.kernels.conftest import DEVICE, TOL, rel_err


@pytest.mark.parametrize("n,k", [(64, 64), (37, 100), (96, 1100)])  # ragged N and K
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv(n, k, dtype, with_bias):
    x = torch.randn(1, k, device=DEVICE).to(dtype)
    w = torch.randn(n, k, device=DEVICE).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if with_bias else None
    out = torch.full((1, n), float("nan"), dtype=dtype, device=DEVICE)  # poison
    y = gemv(x, w, b, out=out)
    assert y is out
    ref = R.gemv(x.cpu(), w.cpu(), None if b is None else b.cpu())
    assert rel_err(y, ref) < TOL[dtype]


def test_gemv_row_slice_of_fused_weight_and_bad_args():
    """A row slice of a fused weight (qkv) works; wrong shapes are ValueError."""
    fused = torch.randn(48, 32, device=DEVICE)
    x = torch.randn(1, 32, device=DEVICE)
    assert rel_err(gemv(x, fused[16:40]), R.gemv(x.cpu(), fused[16:40].cpu())) < 1e-5
    with pytest.raises(ValueError, match="one contiguous row"):
        gemv(torch.randn(2, 32, device=DEVICE), fused)
    with pytest.raises(ValueError, match="does not match"):
        gemv(torch.randn(1, 31, device=DEVICE), fused)

"""Fused RMSNorm (+ residual add) against its torch twin."""

from __future__ import annotations

import pytest
import torch

from encore.kernels import reference as R
from encore.kernels.rmsnorm import rmsnorm
from tests.kernels.conftest import DEVICE, TOL, rel_err


@pytest.mark.parametrize("hidden", [64, 100, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm(hidden, dtype, with_residual):
    x = torch.randn(3, 5, hidden, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    res = torch.randn_like(x) if with_residual else None
    res_ref = res.clone().cpu() if with_residual else None
    y_ref, _ = R.rmsnorm(x.cpu(), w.cpu(), 1e-6, res_ref)
    y = torch.full_like(x, float("nan"))  # poison
    y, res_out = rmsnorm(x, w, 1e-6, res, out=y)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, y_ref) < TOL[dtype]
    if with_residual:
        assert res_out is res
        # the interpreter rounds fp32 -> bf16 toward zero, CUDA to nearest: compare by error
        assert rel_err(res, res_ref) < TOL[dtype]


def test_rmsnorm_per_head_rows_and_bad_args():
    """Qwen3-style q/k norm: normalize each head of q [T, H, D] over D."""
    q = torch.randn(4, 3, 32, device=DEVICE)
    w = torch.randn(32, device=DEVICE)
    y, _ = rmsnorm(q, w, 1e-6)
    assert rel_err(y, R.rmsnorm(q.cpu(), w.cpu(), 1e-6)[0]) < TOL[torch.float32]
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(q, w[:8], 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rmsnorm(q, w, 1e-6, torch.randn(4, 3, 16, device=DEVICE))

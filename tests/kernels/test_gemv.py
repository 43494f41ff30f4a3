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


@pytest.mark.parametrize("n,k", [(64, 64), (37, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fold", ["norm", "norm+bias", "swiglu", "norm+swiglu", "residual"])
def test_gemv_folds(n, k, dtype, fold):
    """The batch-1 folds (RMSNorm before, SiLU x up after, the residual add into the output)
    compute what the twin computes; the residual is updated in place."""
    x = torch.randn(1, k, device=DEVICE).to(dtype) * 3
    rows = 2 * n if "swiglu" in fold else n
    w = (torch.randn(rows, k, device=DEVICE) / k**0.5).to(dtype)
    kw = {}
    if "norm" in fold:
        kw.update(norm_weight=torch.rand(k, device=DEVICE).to(dtype) + 0.5, eps=1e-5)
    if "swiglu" in fold:
        kw["swiglu"] = True
    bias = torch.randn(n, device=DEVICE).to(dtype) if "bias" in fold else None
    cpu = {key: v.cpu() if isinstance(v, torch.Tensor) else v for key, v in kw.items()}
    if fold == "residual":
        res = torch.randn(1, n, device=DEVICE).to(dtype)
        ref = R.gemv(x.cpu(), w.cpu(), residual=res.cpu().clone())
        y = gemv(x, w, residual=res)
        assert y is res
    else:
        ref = R.gemv(x.cpu(), w.cpu(), None if bias is None else bias.cpu(), **cpu)
        y = gemv(x, w, bias, **kw)
        assert y.shape == (1, n)
    assert rel_err(y, ref) < TOL[dtype]


def test_gemv_fold_bad_args():
    w = torch.randn(8, 16, device=DEVICE)
    x = torch.randn(1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="swiglu needs"):
        gemv(x, torch.randn(7, 16, device=DEVICE), swiglu=True)
    with pytest.raises(ValueError, match="norm_weight must be"):
        gemv(x, w, norm_weight=torch.ones(15, device=DEVICE))
    with pytest.raises(ValueError, match="pass one of out and residual"):
        gemv(x, w, out=torch.empty(1, 8, device=DEVICE), residual=torch.zeros(1, 8,
                                                                               device=DEVICE))
    with pytest.raises(ValueError, match="not supported"):
        gemv(x, w, torch.zeros(4, device=DEVICE), swiglu=True)


def test_gemv_writes_float32_logits():
    """A bf16 row into a float32 ``out`` (the batch-1 lm_head): unrounded, not via bf16."""
    x = torch.randn(1, 96, device=DEVICE).to(torch.bfloat16)
    w = torch.randn(40, 96, device=DEVICE).to(torch.bfloat16)
    out = torch.full((1, 40), float("nan"), device=DEVICE)
    assert gemv(x, w, out=out) is out
    ref = x.cpu().float() @ w.cpu().float().t()
    assert rel_err(out, ref) < 1e-5
    with pytest.raises(ValueError, match="not with residual"):
        gemv(x, w, residual=torch.zeros(1, 40, device=DEVICE))

"""KV write kernel against its torch twin (padding slots skipped, dtype cast)."""

from __future__ import annotations

import pytest
import torch

from encore.kernels import reference as R
from encore.kernels.kv_write import kv_write
from tests.kernels.conftest import DEVICE, TOL, rel_err


def _run(num_tokens, hk, d, bs, num_blocks, src_dtype, cache_dtype):
    kv = torch.full((2, num_blocks, bs, hk, d), float("nan"), device=DEVICE).to(cache_dtype)
    slots = torch.randperm(num_blocks * bs)[:num_tokens].to(DEVICE)
    slots[::4] = -1  # padding tokens
    k = torch.randn(num_tokens, hk, d, device=DEVICE).to(src_dtype)
    v = torch.randn(num_tokens, hk, d, device=DEVICE).to(src_dtype)
    ref = kv.clone().cpu()
    R.kv_write(ref, k.cpu(), v.cpu(), slots.cpu())
    kv_write(kv, k, v, slots)
    written = ~torch.isnan(ref.float())
    assert torch.equal(written, ~torch.isnan(kv.cpu().float())), "wrong slots written"
    assert rel_err(kv.cpu()[written], ref[written]) < TOL[cache_dtype]


@pytest.mark.parametrize("hk,d,bs", [(1, 16, 16), (3, 32, 32), (4, 64, 128)])
def test_kv_write(hk, d, bs):
    _run(13, hk, d, bs, 6, torch.float32, torch.float32)


@pytest.mark.parametrize("src,dst", [(torch.bfloat16, torch.bfloat16),
                                     (torch.float32, torch.bfloat16)])
def test_kv_write_dtypes(src, dst):
    _run(9, 2, 32, 16, 4, src, dst)


def test_kv_write_strided_inputs_and_bad_args():
    """k, v as views into a fused qkv buffer (token stride != Hk * D) are accepted."""
    hk, d = 2, 32
    qkv = torch.randn(5, 3 * hk * d, device=DEVICE)
    k, v = qkv[:, hk * d:2 * hk * d].view(5, hk, d), qkv[:, 2 * hk * d:].view(5, hk, d)
    kv = torch.zeros(2, 3, 16, hk, d, device=DEVICE)
    slots = torch.tensor([0, 17, 33, -1, 4], device=DEVICE)
    ref = kv.clone().cpu()
    R.kv_write(ref, k.cpu(), v.cpu(), slots.cpu())
    kv_write(kv, k, v, slots)
    assert torch.equal(kv.cpu(), ref)
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_write(kv, k, v, slots.float())
    with pytest.raises(ValueError, match="match kv_cache"):
        kv_write(kv, k[:, :1], v, slots)

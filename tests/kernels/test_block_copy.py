"""Block gather (pool -> contiguous staging) and scatter (staging -> pool)."""

from __future__ import annotations

import pytest
import torch

from encore.kernels import reference as R
from encore.kernels.block_copy import gather_blocks, scatter_blocks
from tests.kernels.conftest import DEVICE


@pytest.mark.parametrize("shape,block_dim", [((2, 9, 16, 2, 32), 1),  # one layer
                                             ((3, 2, 9, 16, 1, 16), 2),  # all layers
                                             ((9, 4, 3000), 0)])  # E > one program's tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_scatter_roundtrip(shape, block_dim, dtype):
    pool = torch.randn(shape, device=DEVICE).to(dtype)
    ids = torch.tensor([7, 0, 3, 8], device=DEVICE)
    out = torch.full((4, *shape[:block_dim], *shape[block_dim + 1:]), float("nan"),
                     device=DEVICE).to(dtype)
    gather_blocks(pool, ids, block_dim, out=out)
    assert torch.equal(out.cpu(), R.gather_blocks(pool.cpu(), ids.cpu(), block_dim))
    staging = torch.randn_like(out)
    ref = pool.clone().cpu()
    R.scatter_blocks(staging.cpu(), ref, ids.cpu(), block_dim)
    scatter_blocks(staging, pool, ids, block_dim)
    assert torch.equal(pool.cpu(), ref)


def test_bad_layouts_are_rejected():
    pool = torch.randn(2, 9, 16, 2, 32, device=DEVICE)
    ids = torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="viewed"):
        gather_blocks(pool.transpose(3, 4), ids)
    with pytest.raises(ValueError, match="block_ids"):
        gather_blocks(pool, ids.int())
    with pytest.raises(ValueError, match="staging must be"):
        scatter_blocks(torch.zeros(3, 2, 16, 2, 32, device=DEVICE), pool, ids)

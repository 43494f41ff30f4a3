"""Kernel tests: on a machine without CUDA the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, i.e. before
``kernels`` is imported anywhere in the session; this conftest runs before the test modules
of this directory are imported. Tests marked ``gpu`` use full shapes and need CUDA.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN anywhere (an unwritten poisoned output) fails."""
    assert not torch.isnan(out).any(), "output has NaN: some element was never written"
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def paged_batch(seq_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
                dtype: torch.dtype, num_blocks: int | None = None, device: str = DEVICE,
                high_blocks: bool = False):
    """A random paged cache with shuffled, disjoint block tables for ``seq_lens``.

    Returns (kv_cache [2, N, bs, Hk, D], block_tables [B, max_blocks] int32 padded with 0).
    ``high_blocks`` draws the blocks from the top of the pool (large offsets); the cache is
    then torch.empty outside the used blocks, which the OS backs lazily.
    """
    need = [(n + block_size - 1) // block_size for n in seq_lens]
    total = sum(need) + 1
    num_blocks = num_blocks or total + 3
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    if high_blocks:
        kv = torch.empty(shape, dtype=dtype, device=device)
        ids = num_blocks - 1 - torch.randperm(total)
        kv[:, ids] = torch.randn(2, total, *shape[2:], device=device).to(dtype)
    else:
        kv = torch.randn(shape, device=device).to(dtype)
        ids = torch.randperm(num_blocks)[:total]
    tables = torch.zeros(len(seq_lens), max(need + [1]), dtype=torch.int32)
    at = 0
    for b, nb in enumerate(need):
        tables[b, :nb] = ids[at:at + nb].int()
        at += nb
    return kv, tables.to(device)

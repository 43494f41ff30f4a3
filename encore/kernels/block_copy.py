"""Move whole KV blocks between the paged pool and a contiguous staging buffer.

The pool is any tensor whose dim ``block_dim`` indexes blocks, e.g. one layer
``[2, N, bs, Hk, D]`` (block_dim=1) or all layers ``[L, 2, N, bs, Hk, D]`` (block_dim=2).
Viewed as ``[P, N, E]`` (P = product of the dims before the block dim, E = elements of one
block's slice, contiguous), block j of the staging buffer ``[n, P, E]`` is

    staging[j, p] = pool[p, block_ids[j]]      (gather: pool -> staging)
    pool[p, block_ids[j]] = staging[j, p]      (scatter: staging -> pool)

so each block's data is one contiguous run of P * E elements (one CPU / SSD record).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from encore.kernels._common import check, check_int, check_same_device

BLOCK_E = 1024


@triton.jit
def _block_copy_kernel(
    pool_ptr,  # [P, N, E] (strides stride_pp, stride_pn, 1)
    staging_ptr,  # [n, P, E] contiguous
    block_ids_ptr,  # [n] int64
    stride_pp, stride_pn, num_parts, elems,
    SCATTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    e = tl.program_id(2).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < elems
    block = tl.load(block_ids_ptr + j).to(tl.int64)
    pool = pool_ptr + p * stride_pp + block * stride_pn + e
    staging = staging_ptr + (j * num_parts + p) * elems + e
    if SCATTER:
        x = tl.load(staging, mask=mask)
        tl.store(pool, x.to(pool_ptr.dtype.element_ty), mask=mask)
    else:
        x = tl.load(pool, mask=mask)
        tl.store(staging, x.to(staging_ptr.dtype.element_ty), mask=mask)


def _as_parts(pool: torch.Tensor, block_dim: int) -> torch.Tensor:
    """pool as a [P, N, E] view, or ValueError when its layout cannot be viewed so."""
    check(0 <= block_dim < pool.dim(), f"block_dim {block_dim} out of range for {pool.dim()}-d")
    lead, rest = pool.shape[:block_dim], pool.shape[block_dim + 1:]
    try:
        return pool.view(math.prod(lead), pool.shape[block_dim], math.prod(rest))
    except RuntimeError:
        raise ValueError(f"pool of shape {tuple(pool.shape)} and strides {pool.stride()} cannot "
                         f"be viewed as [P, N, E] around block_dim {block_dim}") from None


def _launch(pool: torch.Tensor, staging: torch.Tensor, block_ids: torch.Tensor,
            block_dim: int, scatter: bool) -> None:
    check_int("block_ids", block_ids, (torch.int64,))
    check(block_ids.dim() == 1, f"block_ids must be [n], got {tuple(block_ids.shape)}")
    check_same_device(pool=pool, staging=staging, block_ids=block_ids)
    parts = _as_parts(pool, block_dim)
    p, _, e = parts.shape
    check(staging.is_contiguous() and staging.numel() == block_ids.shape[0] * p * e,
          f"staging must be contiguous with {block_ids.shape[0]} x {p * e} elements, got "
          f"{tuple(staging.shape)} (contiguous={staging.is_contiguous()})")
    if block_ids.shape[0] == 0 or e == 0:
        return
    block = min(BLOCK_E, triton.next_power_of_2(e))
    grid = (block_ids.shape[0], p, triton.cdiv(e, block))
    _block_copy_kernel[grid](parts, staging, block_ids, parts.stride(0), parts.stride(1), p, e,
                             SCATTER=scatter, BLOCK=block)


def gather_blocks(pool: torch.Tensor, block_ids: torch.Tensor, block_dim: int = 1,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy blocks ``block_ids`` ([n] int64) of ``pool`` into a new (or the given) contiguous
    buffer of shape ``[n, *pool.shape[:block_dim], *pool.shape[block_dim+1:]]``."""
    shape = (block_ids.shape[0], *pool.shape[:block_dim], *pool.shape[block_dim + 1:])
    if out is None:
        out = torch.empty(shape, dtype=pool.dtype, device=pool.device)
    check(tuple(out.shape) == shape, f"out must be {shape}, got {tuple(out.shape)}")
    _launch(pool, out, block_ids, block_dim, scatter=False)
    return out


def scatter_blocks(staging: torch.Tensor, pool: torch.Tensor, block_ids: torch.Tensor,
                   block_dim: int = 1) -> None:
    """Inverse of gather_blocks: write staging ([n, *lead, *rest]) into ``pool`` at
    ``block_ids`` (distinct ids; a repeated id gets one of its rows). Mutates pool."""
    shape = (block_ids.shape[0], *pool.shape[:block_dim], *pool.shape[block_dim + 1:])
    check(tuple(staging.shape) == shape, f"staging must be {shape}, got {tuple(staging.shape)}")
    _launch(pool, staging, block_ids, block_dim, scatter=True)

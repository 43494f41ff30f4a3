"""TritonAttentionBackend gives what TorchAttentionBackend gives on the same step."""

from __future__ import annotations

import pytest
import torch

from encore.worker.attention.base import AttentionMetadata
from encore.worker.attention.torch_backend import TorchAttentionBackend
from encore.worker.attention.triton_backend import TritonAttentionBackend
from tests.kernels.conftest import DEVICE, TOL, rel_err


def _meta(query_lens, start_pos, block_size, num_blocks):
    """Metadata of a ragged step; blocks are handed out shuffled, tables padded with 0."""
    seq_lens = [s + q for s, q in zip(start_pos, query_lens, strict=True)]
    need = [(n + block_size - 1) // block_size for n in seq_lens]
    ids = (torch.randperm(num_blocks - 1) + 1)[:sum(need)]
    tables = torch.zeros(len(need), max(need), dtype=torch.int32)
    slots, at = [], 0
    for b, nb in enumerate(need):
        tables[b, :nb] = ids[at:at + nb].int()
        at += nb
        for p in range(start_pos[b], seq_lens[b]):
            slots.append(int(tables[b, p // block_size]) * block_size + p % block_size)
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    return AttentionMetadata(
        query_lens=query_lens, start_pos=start_pos, query_start_loc=qsl.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=tables.to(DEVICE), slot_mapping=torch.tensor(slots, device=DEVICE),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens))


@pytest.mark.parametrize("query_lens,start_pos", [([7, 1, 12], [0, 21, 16]),  # extend
                                                  ([1, 1, 1], [0, 40, 17])])  # decode only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_equals_torch_backend(query_lens, start_pos, dtype):
    bs, hk, h, d = 16, 2, 6, 32
    meta = _meta(query_lens, start_pos, bs, num_blocks=12)
    t = sum(query_lens)
    q, k, v = (torch.randn(t, n, d, device=DEVICE).to(dtype) for n in (h, hk, hk))
    cache = torch.randn(2, 12, bs, hk, d, device=DEVICE).to(dtype)  # the prefixes
    cache_ref = cache.clone()
    out_ref = TorchAttentionBackend().forward(q, k, v, cache_ref, meta, d ** -0.5)
    out = TritonAttentionBackend().forward(q, k, v, cache, meta, d ** -0.5)
    assert rel_err(out, out_ref) < TOL[dtype]
    assert rel_err(cache, cache_ref) < TOL[dtype]

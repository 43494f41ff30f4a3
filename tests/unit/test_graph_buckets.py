"""Decode graphs' context buckets: powers of two up to the context limit, limit included."""

from __future__ import annotations

import pytest

from encore.kernels.decode_attention import _num_splits
from encore.worker import cuda_graphs
from encore.worker.cuda_graphs import context_buckets


@pytest.mark.parametrize(("limit", "expected"), [
    (8192, [128, 256, 512, 1024, 2048, 4096, 8192]),
    (6000, [128, 256, 512, 1024, 2048, 4096, 6000]),
    (128, [128]),
    (100, [100]),
])
def test_context_buckets(limit, expected):
    assert context_buckets(limit) == expected


@pytest.mark.parametrize("limit", [8192, 6000, 256])
def test_buckets_pick_the_split_count_of_the_real_context(limit):
    """A graph captured at a context's bucket runs the split count an eager step at that
    context would: the decode kernel's count depends on next_pow2(context) only."""
    for batch in (1, 2, 8):
        for ctx in range(1, limit + 1, 7):
            bucket = next(b for b in context_buckets(limit) if b >= ctx)
            assert _num_splits(batch, 8, bucket, 64) == _num_splits(batch, 8, ctx, 64), ctx


def test_smallest_bucket_is_a_module_setting(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "SMALLEST_BUCKET", 32)
    assert context_buckets(256) == [32, 64, 128, 256]

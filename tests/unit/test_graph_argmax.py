"""The decode graphs' two-pass argmax equals torch.argmax, ties and all."""

from __future__ import annotations

import pytest
import torch

from encore.worker.cuda_graphs import argmax_rows


@pytest.mark.parametrize("vocab", [128256, 3000, 1031])  # two-pass, two-pass, prime: one pass
def test_argmax_rows_equals_torch_argmax(vocab):
    torch.manual_seed(0)
    logits = torch.randn(5, vocab)
    logits[1, [7, vocab - 3]] = 100.0  # a tie across chunks: the first index wins
    logits[2, :] = 0.0  # all tied
    logits[3, vocab - 1] = 50.0  # the last element
    out = torch.full((5,), -1, dtype=torch.int64)
    assert argmax_rows(logits, out) is out
    assert out.tolist() == torch.argmax(logits, dim=-1).tolist()
    assert out[1] == 7 and out[2] == 0 and out[3] == vocab - 1

"""The sampler's grammar mask on the GPU (shifts on the device) equals the CPU's (numpy)."""

from __future__ import annotations

import pytest
import torch

from encore.worker.sampler import apply_token_bitmask

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("vocab", [49152, 128256, 1000])
def test_bitmask_on_cuda_equals_cpu(vocab):
    gen = torch.Generator().manual_seed(vocab)
    words = -(-min(vocab, 49152) // 32)  # a grammar vocabulary may be smaller than the head
    masks = torch.randint(-2**31, 2**31 - 1, (32, words), generator=gen, dtype=torch.int64)
    masks = masks.to(torch.int32)
    logits = torch.randn(32, vocab, generator=gen)
    cpu, gpu = logits.clone(), logits.cuda()
    apply_token_bitmask(cpu, masks)
    apply_token_bitmask(gpu, masks.cuda())
    assert torch.equal(gpu.cpu(), cpu)
    assert torch.isinf(cpu).any() and torch.isfinite(cpu).any()

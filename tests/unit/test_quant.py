"""Weight-only int8 / int4 matrices (worker/models/quant.py) against their dense twins."""

from __future__ import annotations

import pytest
import torch

from encore.worker.models.quant import dequantized, quantize_int4, quantize_int8


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_quantized_matmul_matches_its_dequantized_matrix(dtype, rows):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=gen) * 0.02
    x = torch.randn(rows, 128, generator=gen).to(dtype)
    for quant, bound in ((quantize_int8, 0.02), (quantize_int4, 0.15)):
        p = quant(w, dtype)
        exact = x.float() @ dequantized(p).t()
        assert rel_err(p.matmul(x), exact) < (1e-5 if dtype == torch.float32 else 1e-2)
        assert rel_err(p.matmul(x), x.float() @ w.t()) < bound  # the quantization error
        assert p.matmul(x).dtype == dtype


def test_int4_recovers_q4_1_blocks_exactly():
    """A matrix made of GGUF Q4_1 blocks (w = d * q + m, codes spanning 0..15) quantizes back
    to itself: loading a Q4_1 GGUF with int4 keeps the file's own 4-bit values."""
    gen = torch.Generator().manual_seed(1)
    n, k = 32, 64
    q = torch.randint(0, 16, (n, k // 32, 32), generator=gen)
    q[..., 0], q[..., 1] = 0, 15  # Q4_1's min/max encoding uses both ends
    d = torch.rand(n, k // 32, 1, generator=gen) * 0.01 + 1e-3
    m = -torch.rand(n, k // 32, 1, generator=gen) * 0.05
    w = (d * q + m).reshape(n, k)
    assert rel_err(dequantized(quantize_int4(w, torch.float32)), w) < 1e-6


def test_quantized_bytes():
    w = torch.randn(256, 512)
    assert quantize_int8(w, torch.bfloat16).nbytes == 256 * 512 + 256 * 2
    assert quantize_int4(w, torch.bfloat16).nbytes == 256 * 256 + (512 // 32) * 256 * 2 * 2


def test_int4_refuses_a_width_not_divisible_by_its_group():
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_int4(torch.randn(8, 40), torch.float32)

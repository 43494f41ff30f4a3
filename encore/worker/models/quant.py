"""Weight-only quantized linear layers for the CPU (``worker.quantization``: int8 | int4).

A batch-1 decode step on a CPU reads every weight once: its speed is memory bandwidth over
weight bytes. Storing the matrices in 8 or 4 bits reads 2x or ~3.2x fewer bytes than bf16;
the kernels are torch's own packed CPU matmuls, which dequantize inside the GEMM:

    int8  per output channel, symmetric:   w = q * s            q in [-127, 127]
          ``aten._weight_int8pack_mm(x, q [N, K] int8, s [N])``
    int4  per group of 32 along K, asymmetric (GGUF Q4_1's layout):
          w = (q - 8) * s + z                                q in [0, 15]
          ``aten._weight_int4pack_mm_for_cpu(x, packed, 32, [K/32, N, 2] (s, z))``

Under int4 the LM head stays int8 (llama.cpp keeps the output matrix at 8 bits too): it is
the model's largest matrix and the one whose errors reach the logits directly. Embeddings
and norms stay in the model dtype. Quantizing at load time from the loaded weights recovers a
GGUF Q4_1 tensor's own 4-bit values exactly (min/max per block of 32: its codes span 0..15),
up to the model dtype's rounding of the block scale and minimum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

INT4_GROUP = 32
MODES = ("none", "int8", "int4")


@dataclass
class PackedLinear:
    """A quantized [N, K] weight; ``matmul(x [T, K]) -> [T, N]`` in x's dtype."""

    kind: str  # "int8" or "int4"
    data: torch.Tensor  # int8 [N, K], or packed int4 uint8 [N, K/2]
    scales: torch.Tensor  # int8: [N]; int4: [K/group, N, 2] (scale, zero)
    shape: tuple[int, int]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "int8":
            return torch.ops.aten._weight_int8pack_mm(x, self.data, self.scales)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.data, INT4_GROUP,
                                                          self.scales)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> PackedLinear:
    """Symmetric per-row int8 of ``w`` [N, K] (scales in ``dtype``, the activations')."""
    wf = w.float()
    scale = (wf.abs().amax(1) / 127).clamp_min(1e-12)
    q = (wf / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return PackedLinear("int8", q.contiguous(), scale.to(dtype), tuple(w.shape))


def quantize_int4(w: torch.Tensor, dtype: torch.dtype) -> PackedLinear:
    """Asymmetric int4 of ``w`` [N, K] in groups of 32 along K (min/max, as GGUF Q4_1)."""
    n, k = w.shape
    if k % INT4_GROUP:
        raise ValueError(f"int4 needs in-features divisible by {INT4_GROUP}, got {k}")
    wg = w.float().reshape(n, k // INT4_GROUP, INT4_GROUP)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = ((wg - lo) / scale).round_().clamp_(0, 15).to(torch.int32).reshape(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    zero = lo + 8 * scale  # (q - 8) * s + z == q * s + lo
    sz = torch.stack((scale.squeeze(-1).t(), zero.squeeze(-1).t()), -1)
    return PackedLinear("int4", packed, sz.to(dtype).contiguous(), (n, k))


def dequantized(p: PackedLinear) -> torch.Tensor:
    """The fp32 matrix ``p`` stands for (tests)."""
    n, k = p.shape
    eye = torch.eye(k, dtype=p.scales.dtype)
    return p.matmul(eye).float().t().contiguous() if p.kind == "int4" else \
        p.data.float() * p.scales.float()[:, None]


LAYER_WEIGHTS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def quantize_model(model: Any, mode: str) -> dict[str, int]:
    """Replace the model's matrices by ``PackedLinear`` (in place); bytes before and after."""
    if mode not in MODES[1:]:
        raise ValueError(f"quantization {mode!r} is not supported (choose from {MODES})")
    dtype = model.embed_tokens.dtype
    quant = quantize_int8 if mode == "int8" else quantize_int4
    before = after = 0
    with torch.no_grad():
        for layer in model.layers:
            for name in LAYER_WEIGHTS:
                w = getattr(layer, name)
                packed = quant(w, dtype)
                before, after = before + w.nbytes, after + packed.nbytes
                delattr(layer, name)
                setattr(layer, name, packed)
        head = model.lm_head
        packed = quantize_int8(head, dtype)
        before, after = before + head.nbytes, after + packed.nbytes
        delattr(model, "lm_head")
        model.lm_head = packed
    return {"dense_bytes": before, "packed_bytes": after}

"""Random weights of a named shape, created on the target device in the target dtype.

Matrices ~ N(0, 0.02), norm weights 1, biases 0: finite activations at any depth, which is
all a benchmark needs. Seeded by ``ModelConfig.seed`` with a generator on the device, so an 8B
shape fills on a GPU in well under a second and never touches host memory. Under tensor
parallelism each rank draws its own shards (the model differs from the one-rank model of the
same seed; nothing full-size is ever made).
"""

from __future__ import annotations

import torch

from encore.worker.attention.base import AttentionBackend
from encore.worker.models.arch import ModelArch
from encore.worker.models.llama import LlamaForCausalLM
from encore.worker.models.presets import preset
from encore.worker.parallel import SINGLE, TPGroup, check_divisible


def load_dummy(
    name: str,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    attn: AttentionBackend,
    max_positions: int | None = None,
    tp: TPGroup = SINGLE,
) -> tuple[LlamaForCausalLM, ModelArch]:
    arch = preset(name)
    model = build_empty(arch, attn, device, dtype, max_positions, tp)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + 7919 * tp.rank)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in pname else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model, arch


def build_empty(
    arch: ModelArch,
    attn: AttentionBackend,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int | None = None,
    tp: TPGroup = SINGLE,
) -> LlamaForCausalLM:
    """The model (this rank's shards under ``tp``) with uninitialised parameters allocated
    directly on ``device`` in ``dtype``; ModelLoadError if ``tp`` cannot split ``arch``."""
    try:
        check_divisible(arch, tp.size)
    except ValueError as e:
        from encore.configs.model_source import ModelLoadError

        raise ModelLoadError(str(e)) from None
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(arch, attn, max_positions=max_positions, tp=tp)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()

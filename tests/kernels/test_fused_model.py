"""The model's fused path (TritonOps: add+RMSNorm, in-place RoPE, SiLU x up) computes what
the plain-torch path computes: same logits (fp32) in a prefill and in the decode step after
it, for Llama (llama3 RoPE scaling), Qwen2 (qkv bias, tied head) and Qwen3 (q/k norm). On a
machine without CUDA the kernels run under the interpreter."""

from __future__ import annotations

import pytest
import torch

from encore.configs.types import ModelConfig
from encore.worker.attention.torch_backend import TorchAttentionBackend
from encore.worker.loader import load_model
from encore.worker.models.ops import TritonOps, select_ops
from tests.helpers.paged import alloc_kv_caches, make_batch
from tests.helpers.tiny_models import make_tiny_model_dir
from tests.kernels.conftest import DEVICE

pytest.importorskip("transformers")
BLOCK = 4


def _logits(model, arch, ids: list[int]) -> torch.Tensor:
    """Logits of a 9-token prefill, then of one decode token after it."""
    caches = [c.to(DEVICE) for c in alloc_kv_caches(arch, num_blocks=16, block_size=BLOCK)]
    table = [[5, 2, 9]]
    out = []
    for toks, start in ((ids[:9], 0), (ids[9:10], 9)):
        b = make_batch([(toks, start)], table, BLOCK, DEVICE)
        out.append(model.compute_logits(model(b.input_ids, b.positions, caches, b.meta)))
    return torch.cat(out)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fused_path_equals_torch_path(family, tmp_path):
    path = make_tiny_model_dir(tmp_path / family, family)
    model, arch = load_model(ModelConfig(model=str(path)), torch.device(DEVICE),
                             torch.float32, TorchAttentionBackend())
    ids = torch.randint(3, arch.vocab_size, (10,)).tolist()
    model.ops = None
    ref = _logits(model, arch, ids)
    model.ops = TritonOps()
    got = _logits(model, arch, ids)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_ops_are_chosen_by_device_and_backend():
    assert isinstance(select_ops(torch.device("cuda"), "triton"), TritonOps)
    assert select_ops(torch.device("cuda"), "torch") is None
    assert select_ops(torch.device("cpu"), "triton") is None

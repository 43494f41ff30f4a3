"""Model plugins: ``model: "python:MODULE:FUNCTION"`` builds the model with your own code.

FUNCTION is called like :func:`worker.loader.load_model` itself and returns ``(model, arch)``::

    def build(model_config, device, dtype, attn) -> tuple[torch.nn.Module, ModelArch]: ...

The model follows ``LlamaForCausalLM``'s interface: ``model(input_ids [T], positions [T],
kv_caches, meta) -> hidden [T, ...]`` and ``model.compute_logits(hidden [n, ...]) -> [n, V]``
fp32. ``arch`` sizes the KV pool (``kv_cache_shape``: ``num_layers`` tensors of ``[2, blocks,
block_size, num_kv_heads, head_dim]``) and gives ``vocab_size`` and ``max_position_embeddings``.
The module must be importable by the worker (``PYTHONPATH``). Plugins run eagerly: on CUDA
set ``enforce_eager`` unless the model can be captured in a CUDA graph.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from encore.configs.model_source import ModelLoadError
from encore.configs.types import ModelConfig
from encore.worker.models.arch import ModelArch

if TYPE_CHECKING:
    import torch

    from encore.worker.attention.base import AttentionBackend


def load_plugin(
    target: str,
    model_config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    attn: AttentionBackend,
) -> tuple[Any, ModelArch]:
    """Import ``MODULE:FUNCTION`` and call it; ModelLoadError (one line) for a bad target."""
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelLoadError(f"model plugin module '{module_name}' cannot be imported: {e}") from e
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ModelLoadError(f"model plugin module '{module_name}' has no function '{func_name}'")
    result = factory(model_config, device, dtype, attn)
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], ModelArch)):
        raise ModelLoadError(f"model plugin '{target}' must return (model, ModelArch)")
    return result

"""Weight loaders: ``load_model`` picks GGUF, safetensors, dummy or a model plugin
(``python:MODULE:FUNCTION``, see plugin.py) from the resolved config.

model, arch = load_model(config.model, torch.device("cpu"), torch.bfloat16, attn)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from encore.configs.model_source import (
    ModelLoadError,
    ResolvedModel,
    default_gguf_path,
    resolve_model,
)
from encore.configs.types import ModelConfig
from encore.worker.models.arch import ModelArch

if TYPE_CHECKING:  # importing this package stays torch-free until load_model runs
    import torch

    from encore.worker.attention.base import AttentionBackend
    from encore.worker.models.llama import LlamaForCausalLM
    from encore.worker.parallel import TPGroup

__all__ = ["ModelLoadError", "ResolvedModel", "default_gguf_path", "load_model", "resolve_model"]

Progress = Callable[[int, int], None]  # (tensors done, total)


def load_model(
    model_config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    attn: AttentionBackend,
    progress: Progress | None = None,
    tp: TPGroup | None = None,
) -> tuple[LlamaForCausalLM, ModelArch]:
    """Load weights onto ``device`` in ``dtype``. RoPE tables cover ``max_model_len`` when set.
    Under tensor parallelism (``tp``) only this rank's shard of each weight is kept.

    Progress goes to ``progress`` when given, else to a tqdm bar when stderr is a terminal.
    Raises ModelLoadError (one line) for anything missing or unsupported.
    """
    from encore.worker.parallel import SINGLE

    tp = tp or SINGLE
    resolved = resolve_model(model_config)
    positions = model_config.max_model_len
    if resolved.load_format == "python":
        from encore.worker.loader.plugin import load_plugin

        if tp.size > 1:
            raise ModelLoadError("model plugins do not support tensor_parallel_size > 1")

        return load_plugin(resolved.path, model_config, device, dtype, attn)
    with _progress(progress, resolved.name) as report:
        if resolved.load_format == "dummy":
            from encore.worker.loader.dummy_loader import load_dummy

            return load_dummy(resolved.path, model_config.seed, device, dtype, attn, positions,
                              tp)
        if resolved.load_format == "gguf":
            from encore.worker.loader.gguf_loader import load_gguf

            return load_gguf(resolved.path, device, dtype, attn, positions, report, tp)
        from encore.worker.loader.hf_loader import load_hf

        return load_hf(resolved.path, device, dtype, attn, positions, report, tp)


class _progress:
    """Context manager yielding a progress callback (user's, tqdm on a TTY, or None)."""

    def __init__(self, callback: Progress | None, name: str) -> None:
        self.callback, self.name, self.bar = callback, name, None

    def __enter__(self) -> Progress | None:
        if self.callback is not None or not sys.stderr.isatty():
            return self.callback
        from tqdm import tqdm

        self.bar = tqdm(desc=f"loading {self.name}", unit="tensor", leave=False)
        return self._tick

    def _tick(self, done: int, total: int) -> None:
        assert self.bar is not None
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

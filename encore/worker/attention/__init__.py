"""Attention backends, chosen by name from a registry."""

from __future__ import annotations

from encore.worker.attention.base import AttentionBackend, AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "get_backend"]


def get_backend(name: str) -> AttentionBackend:
    """``torch`` (reference, CPU) or ``triton`` (CUDA). Unknown names are a clear error."""
    if name == "torch":
        from encore.worker.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        try:
            from encore.worker.attention.triton_backend import TritonAttentionBackend
        except ImportError as e:
            raise ValueError(f"attention backend 'triton' is not available: {e}") from None
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose one of ['torch', 'triton']")

"""The shape of a Llama-family decoder: everything the model code needs, nothing about files.

Loaders turn a Hugging Face ``config.json`` or GGUF metadata into a :class:`ModelArch`; the
model, the KV-cache sizing and the dummy presets read only this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Keys HF requires for llama3 RoPE scaling (the only scaling type we implement).
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class ModelArch:
    """Hyper-parameters of a Llama / Mistral / Qwen2 / Qwen3 decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False, compare=True)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k, before RoPE
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list, hash=False)
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        check_rope_scaling(self.rope_scaling)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        layer = attn + 3 * d * i + 2 * d + (2 * self.head_dim if self.qk_norm else 0)
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_layers * layer + d + head


def check_rope_scaling(rope_scaling: dict[str, Any] | None) -> None:
    """Accept no scaling, ``default`` or ``llama3`` (with all its keys); refuse anything else."""
    if rope_scaling is None:
        return
    kind = rope_type(rope_scaling)
    if kind == "default":
        return
    if kind != "llama3":
        raise ValueError(
            f"rope scaling type {kind!r} is not supported (supported: default, llama3)"
        )
    missing = [k for k in LLAMA3_KEYS if k not in rope_scaling]
    if missing:
        raise ValueError(f"llama3 rope scaling is missing {missing}")


def rope_type(rope_scaling: dict[str, Any] | None) -> str:
    """``default`` or ``llama3`` (after :func:`check_rope_scaling`)."""
    if rope_scaling is None:
        return "default"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))

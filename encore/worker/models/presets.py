"""Named model shapes for ``load_format=dummy`` (random weights; benchmarks and tests).

Torch-free, so the path resolver can validate a preset name without loading anything.
"""

from __future__ import annotations

from encore.worker.models.arch import ModelArch

_LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, ModelArch] = {
    "llama-3-8b": ModelArch(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_ids=[128001, 128009],
        architecture="LlamaForCausalLM",
    ),
    "llama-3-70b": ModelArch(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_ids=[128001, 128009],
        architecture="LlamaForCausalLM",
    ),
    "llama-3.2-1b": ModelArch(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_ids=[128001, 128008, 128009],
        architecture="LlamaForCausalLM",
    ),
    "smollm2-135m": ModelArch(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=[2],
        architecture="LlamaForCausalLM",
    ),
    # A few hundred KB: unit tests of the runner/engine that need *a* model.
    "tiny": ModelArch(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_ids=[2],
        architecture="LlamaForCausalLM",
    ),
}


def preset(name: str) -> ModelArch:
    """The arch of a preset; KeyError names the choices."""
    if name not in PRESETS:
        raise KeyError(f"unknown dummy preset {name!r} (choose one of {sorted(PRESETS)})")
    return PRESETS[name]

"""A llama.cpp GGUF file (architecture ``llama``): metadata -> ModelArch, tensors dequantized.

Quantized tensors are dequantized to float32 with ``gguf.quants`` (numpy) one at a time and
copied into the model in its dtype, so peak host memory is the model plus one fp32 tensor.

llama.cpp's converter permutes the rows of attn_q / attn_k so that its interleaved RoPE sees
HF's rotate-half pairs; we undo that here, per head (n_head for q, n_head_kv for k).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from encore.configs.model_source import ModelLoadError
from encore.worker.attention.base import AttentionBackend
from encore.worker.loader.dummy_loader import build_empty
from encore.worker.models.arch import ModelArch
from encore.worker.models.llama import LlamaForCausalLM, expected_weight_names, llama3_scale
from encore.worker.parallel import SINGLE, TPGroup

Progress = Callable[[int, int], None]

_T = GGMLQuantizationType
SUPPORTED_TYPES = (_T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q4_K, _T.Q6_K)

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def arch_from_gguf(reader: GGUFReader, path: str) -> ModelArch:
    """ModelArch from ``llama.*`` metadata; ModelLoadError for other architectures."""
    kind = field_value(reader, "general.architecture")
    if kind != "llama":
        raise ModelLoadError(
            f"GGUF architecture {kind!r} in '{path}' is not supported (supported: llama)"
        )
    scaling = field_value(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ModelLoadError(f"'{path}': GGUF rope scaling {scaling!r} is not supported")

    def get(key: str, default: Any = None) -> Any:
        value = field_value(reader, f"llama.{key}", default)
        if value is None:
            raise ModelLoadError(f"'{path}' lacks GGUF metadata llama.{key}")
        return value

    tensors = {t.name: t for t in reader.tensors}
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = field_value(reader, "llama.vocab_size") or (len(tokens.data) if tokens else None)
    if vocab is None:
        vocab = int(tensors["token_embd.weight"].shape[1])
    eos = [field_value(reader, f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id")]
    head_dim = int(field_value(reader, "llama.attention.key_length") or hidden // heads)
    arch = ModelArch(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(int(e) for e in eos if e is not None)),
        architecture="LlamaForCausalLM",
    )
    if "rope_freqs.weight" in tensors:
        arch = _with_llama3_scaling(arch, _dequant(tensors["rope_freqs.weight"]), path)
    return arch


def _with_llama3_scaling(arch: ModelArch, factors: np.ndarray, path: str) -> ModelArch:
    """llama.cpp stores llama3 RoPE scaling as per-frequency divisors (rope_freqs); recover the
    HF parameters (Llama 3.1/3.2 use low=1, high=4, original length 8192) and verify them."""
    from dataclasses import replace

    from encore.worker.models.llama import rope_inv_freq

    guess = {
        "rope_type": "llama3",
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    base = rope_inv_freq(arch)
    implied = (base / llama3_scale(base, guess)).numpy()
    if implied.shape != factors.shape or not np.allclose(implied, factors, rtol=1e-3):
        raise ModelLoadError(f"'{path}': rope_freqs do not match llama3 scaling; not supported")
    return replace(arch, rope_scaling=guess)


def _dequant(t: ReaderTensor) -> np.ndarray:
    if t.tensor_type not in SUPPORTED_TYPES:
        raise ModelLoadError(
            f"GGUF tensor {t.name} has type {t.tensor_type.name}, not supported "
            f"(supported: {', '.join(x.name for x in SUPPORTED_TYPES)})"
        )
    w = dequantize(t.data, t.tensor_type)
    return w.reshape(tuple(int(x) for x in reversed(t.shape.tolist())))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE layout)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_name(gguf_name: str) -> str | None:
    """HF weight name for a GGUF tensor name (None for tensors we do not load)."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def load_gguf(
    path: str,
    device: torch.device,
    dtype: torch.dtype,
    attn: AttentionBackend,
    max_positions: int | None = None,
    progress: Progress | None = None,
    tp: TPGroup = SINGLE,
) -> tuple[LlamaForCausalLM, ModelArch]:
    """Under tensor parallelism each tensor is dequantized whole (one at a time) and the
    rank keeps its rows."""
    reader = GGUFReader(path)
    arch = arch_from_gguf(reader, path)
    model = build_empty(arch, attn, device, dtype, max_positions, tp)
    loaded: set[str] = set()
    for i, t in enumerate(reader.tensors):
        name = hf_name(t.name)
        if name is None:
            if t.name != "rope_freqs.weight":
                raise ModelLoadError(f"'{path}': unexpected GGUF tensor {t.name}")
            continue
        w = _dequant(t)
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, arch.num_heads)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, arch.num_kv_heads)
        if not w.flags.writeable:  # an F32 tensor is a view of the read-only memmap
            w = w.copy()
        model.load_weight(name, torch.from_numpy(np.ascontiguousarray(w)))
        loaded.add(name)
        if progress is not None:
            progress(i + 1, len(reader.tensors))
    missing = [n for n in expected_weight_names(arch) if n not in loaded]
    if missing:
        raise ModelLoadError(f"'{path}': {len(missing)} tensors missing, e.g. {missing[0]!r}")
    return model, arch

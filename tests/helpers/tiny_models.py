"""Tiny random Hugging Face model directories (Llama, Qwen2, Qwen3) with a real tokenizer.

    path = make_tiny_model_dir(tmp_path / "llama", "llama")
    # -> config.json, model.safetensors, tokenizer.json, tokenizer_config.json
The tokenizer is a byte-level BPE (GPT-2 / SmolLM2 style) trained in-process on a few lines of
text, with ChatML specials ``<|endoftext|>`` (0), ``<|im_start|>`` (1), ``<|im_end|>`` (2) and a
ChatML chat template. Weights are random but not degenerate (biases and norm weights too).
Nothing is downloaded. Needs transformers (a dev dependency) for the model side only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_ID, EOS_ID = 1, 2
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Encore is a serving daemon that remembers the KV cache of earlier requests.",
    "def add(a, b):\n    return a + b\n",
    "Paged attention stores keys and values in fixed-size blocks of tokens.",
    "Héllo wörld! Ça va? 日本語のテキスト, emoji 🙂 and numbers 12345.",
    "system user assistant tool: hello, how are you today? I am fine, thank you.",
]
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def build_tokenizer(vocab_size: int = 320):  # -> tokenizers.Tokenizer
    """A byte-level BPE trained on a tiny corpus; ids 0..2 are the ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def save_tokenizer(path: Path, chat_template: str = CHATML_TEMPLATE) -> int:
    """Write tokenizer.json + tokenizer_config.json into ``path``; return the vocab size."""
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "chat_template": chat_template,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size()


def hf_config(family: str, vocab_size: int, **overrides: Any):  # -> PretrainedConfig
    """A tiny transformers config of ``family`` in {llama, qwen2, qwen3}."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    shape: dict[str, Any] = dict(
        TINY_SHAPE, vocab_size=vocab_size, bos_token_id=BOS_ID, eos_token_id=EOS_ID
    )
    if family == "llama":
        shape.update(
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
        cls = LlamaConfig
    elif family == "qwen2":
        shape.update(
            tie_word_embeddings=True,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
        cls = Qwen2Config
    elif family == "qwen3":
        shape.update(
            tie_word_embeddings=False,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
        cls = Qwen3Config
    else:
        raise ValueError(f"unknown family {family!r}")
    shape.update(overrides)
    return cls(**shape)


def randomize_(model, seed: int = 0, std: float = 0.1) -> None:
    """Random weights everywhere, including biases (~N(0, std)) and norms (~1 + N(0, std))."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
            p.copy_(noise + 1.0 if "norm" in name else noise)


def make_tiny_model_dir(
    path: Path | str, family: str = "llama", seed: int = 0, **config_overrides: Any
) -> Path:
    """Write a complete tiny HF model dir (safetensors + tokenizer) and return its path."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    vocab = save_tokenizer(path)
    config = hf_config(family, config_overrides.pop("vocab_size", vocab), **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _gguf_name(hf: str) -> str:
    if hf in _GGUF_TOP:
        return _GGUF_TOP[hf]
    _, _, n, rest = hf.split(".", 3)
    return f"blk.{n}.{_GGUF_LAYER[rest]}"


def _llama_cpp_permute(w, n_head: int):
    """What llama.cpp's converter does to attn_q / attn_k rows (HF -> interleaved RoPE)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


LLAMA31_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def make_tiny_gguf(
    path: Path | str,
    seed: int = 0,
    qtype: str = "F32",
    tie_word_embeddings: bool = False,
    llama3_rope: bool = False,
) -> tuple[Path, Path]:
    """A tiny Llama GGUF written the way llama.cpp's converter writes one (permuted q/k,
    GPT-2 byte-level BPE tokenizer metadata, ChatML template). 2-D weights are stored as
    ``qtype`` (F32, F16, BF16, Q8_0, Q4_0, Q4_1), norms as F32. ``llama3_rope`` uses Llama
    3.1's RoPE scaling, stored as llama.cpp does (a ``rope_freqs`` tensor). Returns (gguf
    file, the HF directory it was converted from, with the same weights)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    path = Path(path)
    rope = (
        {"rope_parameters": LLAMA31_ROPE, "max_position_embeddings": 16384}
        if llama3_rope
        else {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    )
    hf_dir = make_tiny_model_dir(
        path.parent / f"{path.stem}-hf",
        "llama",
        seed,
        tie_word_embeddings=tie_word_embeddings,
        **rope,
    )
    cfg = json.loads((hf_dir / "config.json").read_text())
    w = gguf.GGUFWriter(str(path), "llama")
    _gguf_arch_metadata(w, cfg)
    _gguf_tokenizer_metadata(w, hf_dir)
    heads = {
        "attn_q.weight": cfg["num_attention_heads"],
        "attn_k.weight": cfg["num_key_value_heads"],
    }
    qt = gguf.GGMLQuantizationType[qtype]
    for name, tensor in sorted(load_file(str(hf_dir / "model.safetensors")).items()):
        gname = _gguf_name(name)
        t = tensor.astype(np.float32)
        if gname.split(".", 2)[-1] in heads:
            t = _llama_cpp_permute(t, heads[gname.split(".", 2)[-1]])
        if t.ndim == 2 and qt != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(t, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, t)
    if llama3_rope:
        w.add_tensor("rope_freqs.weight", _llama_cpp_rope_factors(cfg))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, hf_dir


def _gguf_arch_metadata(w, cfg: dict[str, Any]) -> None:
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])


def _gguf_tokenizer_metadata(w, hf_dir: Path) -> None:
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(0)
    w.add_pad_token_id(EOS_ID)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)


def _llama_cpp_rope_factors(cfg: dict[str, Any]):
    """llama.cpp's converter: llama3 scaling as one divisor per rotary frequency."""
    import math

    import numpy as np

    rope, dim = cfg["rope_parameters"], cfg["head_dim"]
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)

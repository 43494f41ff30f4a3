"""A local Hugging Face directory: config.json + *.safetensors (never pickle, never a hub)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from encore.configs.model_source import ModelLoadError
from encore.worker.attention.base import AttentionBackend
from encore.worker.loader.dummy_loader import build_empty
from encore.worker.models.arch import ModelArch
from encore.worker.models.llama import LlamaForCausalLM, expected_weight_names
from encore.worker.parallel import SINGLE, TPGroup

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

Progress = Callable[[int, int], None]  # (done, total)


def arch_from_hf_config(cfg: dict[str, Any], path: str = "config.json") -> ModelArch:
    """ModelArch from a parsed config.json; ModelLoadError for unsupported models."""
    archs = cfg.get("architectures") or [""]
    name = archs[0]
    if name not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"architecture {name!r} in {path} is not supported (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", name == "MistralForCausalLM"):
        raise ModelLoadError(f"{path}: sliding-window attention is not supported")
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type")) == "default":
        rope = {}
    heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    try:
        return ModelArch(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope or None,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=name == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            qk_norm=name == "Qwen3ForCausalLM",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[] if eos is None else list(eos) if isinstance(eos, list) else [eos],
            architecture=name,
        )
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"{path}: {e}") from None


def _check_supported_features(cfg: dict[str, Any], path: str) -> None:
    if cfg.get("mlp_bias"):
        raise ModelLoadError(f"{path}: mlp_bias=true is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{path}: hidden_act={cfg['hidden_act']!r} is not supported")


def load_hf(
    path: str,
    device: torch.device,
    dtype: torch.dtype,
    attn: AttentionBackend,
    max_positions: int | None = None,
    progress: Progress | None = None,
    tp: TPGroup = SINGLE,
) -> tuple[LlamaForCausalLM, ModelArch]:
    """Under tensor parallelism each rank reads only its rows of each tensor (safetensors
    slices)."""
    root = Path(path)
    cfg = json.loads((root / "config.json").read_text())
    _check_supported_features(cfg, str(root / "config.json"))
    arch = arch_from_hf_config(cfg, str(root / "config.json"))
    arch = _with_generation_eos(arch, root)
    model = build_empty(arch, attn, device, dtype, max_positions, tp)
    files = sorted(root.glob("*.safetensors"))
    total = sum(len(_keys(f)) for f in files)
    loaded: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if not name.endswith("rotary_emb.inv_freq"):
                    model.load_weight(name, f.get_slice(name) if tp.size > 1
                                      and not name.endswith("_scale") else f.get_tensor(name))
                loaded.add(name)
                if progress is not None:
                    progress(len(loaded), total)
    missing = [n for n in expected_weight_names(arch) if n not in loaded]
    if missing:
        raise ModelLoadError(f"{root}: {len(missing)} weights missing, e.g. {missing[0]!r}")
    return model, arch


def _keys(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt", device="cpu") as f:
        return list(f.keys())


def _with_generation_eos(arch: ModelArch, root: Path) -> ModelArch:
    """Add generation_config.json's eos ids (chat models often list their turn-end token there)."""
    gen = root / "generation_config.json"
    if not gen.is_file():
        return arch
    eos = json.loads(gen.read_text()).get("eos_token_id")
    extra = [] if eos is None else eos if isinstance(eos, list) else [eos]
    ids = list(dict.fromkeys([*arch.eos_token_ids, *extra]))
    from dataclasses import replace

    return replace(arch, eos_token_ids=ids)

"""resolve_model / load_model refuse bad inputs with one clear line (and never download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from encore.configs.model_source import ModelLoadError, default_gguf_path, resolve_model
from encore.configs.types import ModelConfig


def one_line_error(config: ModelConfig, match: str) -> str:
    with pytest.raises(ModelLoadError, match=match) as info:
        resolve_model(config)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path: Path):
    msg = one_line_error(ModelConfig(model=str(tmp_path / "nope")), "does not exist")
    assert msg == (
        f"model path '{tmp_path / 'nope'}' does not exist (Encore never downloads from a hub)"
    )


def test_hub_style_name_is_not_downloaded():
    one_line_error(ModelConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct"), "never downloads")


def test_dir_with_only_pickle_checkpoint(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    one_line_error(ModelConfig(model=str(tmp_path)), "pickle")


def test_pickle_file(tmp_path: Path):
    (tmp_path / "model.pt").write_bytes(b"\x80\x04")
    one_line_error(ModelConfig(model=str(tmp_path / "model.pt")), "pickle")


def test_empty_dir(tmp_path: Path):
    one_line_error(ModelConfig(model=str(tmp_path)), "no \\*.safetensors")


def test_unknown_dummy_preset():
    msg = one_line_error(ModelConfig(model="gpt-17", load_format="dummy"), "unknown dummy preset")
    assert "llama-3-8b" in msg and "tiny" in msg


def test_preset_name_needs_dummy_format():
    one_line_error(ModelConfig(model="llama-3-8b"), "load_format=dummy")
    assert (
        resolve_model(ModelConfig(model="llama-3-8b", load_format="dummy")).load_format == "dummy"
    )


def test_format_mismatch(tmp_path: Path):
    one_line_error(ModelConfig(model="", load_format="safetensors"), "does not match")


def test_default_is_embedded_gguf():
    resolved = resolve_model(ModelConfig())
    assert resolved.load_format == "gguf" and resolved.path == str(default_gguf_path())
    assert resolved.name == "SmolLM2-135M-Instruct"


def test_unsupported_architecture(tmp_path: Path):
    import torch

    from encore.worker.attention.torch_backend import TorchAttentionBackend
    from encore.worker.loader import load_model

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="'GPT2LMHeadModel' .* not supported") as info:
        load_model(
            ModelConfig(model=str(tmp_path)),
            torch.device("cpu"),
            torch.float32,
            TorchAttentionBackend(),
        )
    assert "\n" not in str(info.value)


def test_unsupported_rope_scaling_type():
    from encore.worker.loader.hf_loader import arch_from_hf_config

    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
    }
    with pytest.raises(ModelLoadError, match="'yarn' is not supported"):
        arch_from_hf_config(cfg)


def test_missing_weights_are_reported(tmp_path: Path):
    import torch
    from safetensors.torch import save_file

    from encore.worker.attention.torch_backend import TorchAttentionBackend
    from encore.worker.loader import load_model

    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"model.norm.weight": torch.ones(8)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="weights missing"):
        load_model(
            ModelConfig(model=str(tmp_path)),
            torch.device("cpu"),
            torch.float32,
            TorchAttentionBackend(),
        )


def test_gguf_rope_freqs_that_are_not_llama3_are_refused():
    import numpy as np

    from encore.worker.loader.gguf_loader import _with_llama3_scaling
    from encore.worker.models.presets import preset

    arch = preset("tiny")
    with pytest.raises(ModelLoadError, match="rope_freqs do not match llama3"):
        _with_llama3_scaling(arch, np.linspace(1, 3, arch.head_dim // 2, dtype=np.float32), "x")


def test_gguf_of_other_architecture_is_refused(tmp_path: Path):
    import gguf

    from encore.worker.loader.gguf_loader import arch_from_gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="GGUF architecture 'gpt2' .* not supported"):
        arch_from_gguf(gguf.GGUFReader(str(tmp_path / "m.gguf")), "m.gguf")


def test_dummy_preset_names_match_the_presets():
    from encore.configs.model_source import DUMMY_PRESETS
    from encore.worker.models.presets import PRESETS

    assert set(DUMMY_PRESETS) == set(PRESETS)

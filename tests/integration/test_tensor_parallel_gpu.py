"""Tensor parallelism over NCCL (``-m gpu``, two or more GPUs of one host): the CPU tests'
equalities on CUDA, with the Triton kernels and, through the engine, CUDA graphs captured
per rank with the all-reduces inside."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from encore.protocol.executor import MPExecutor
from encore.worker.executor import InprocExecutor
from tests.helpers import tp_ranks
from tests.integration.test_tensor_parallel import (
    FAMILIES,
    PROMPTS,
    engine_config,
    generate_all,
    model_dirs,  # noqa: F401 (fixture)
    split_logits,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2,
                       reason="tensor parallelism on CUDA needs two GPUs of one host"),
]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_split_logits_match_the_whole_model_nccl(model_dirs, name, tmp_path):  # noqa: F811
    whole = tp_ranks.prefill_and_decode_logits(
        tp_ranks.model_runner(model_dirs[name], device="cuda"), PROMPTS).cpu().numpy()
    split = split_logits(model_dirs[name], 2, tmp_path, device="cuda")
    rel = np.abs(split - whole).max() / np.abs(whole).max()
    assert rel < 1e-4, f"relative error {rel:.2e}"


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "cuda-graphs"])
def test_engine_greedy_tokens_equal_one_rank_nccl(model_dirs, eager):  # noqa: F811
    one = engine_config(model_dirs["llama"], enforce_eager=eager)
    two = engine_config(model_dirs["llama"], tensor_parallel_size=2, enforce_eager=eager)
    expected = asyncio.run(generate_all(one, InprocExecutor(one)))
    got = asyncio.run(generate_all(two, MPExecutor(two)))
    assert got == expected

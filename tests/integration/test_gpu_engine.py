"""The engine on a CUDA GPU: triton attention, decode CUDA graphs, exact tokens.

A tiny random Llama (built here, nothing downloaded) runs through the real scheduler and model
runner. Greedy tokens must equal transformers' ``generate`` on the same weights (fp32), one
request's tokens must not depend on its batch neighbours (chunked prefill, preemption, padded
graph sizes), a prefix hit must answer as a cold run does, and graph replay must equal the
eager forward. Run on a GPU machine with ``pytest -m gpu tests/integration/test_gpu_engine.py``.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from encore.configs.loading import build_config
from encore.protocol.messages import EngineRequest, SamplingParams
from encore.scheduler.engine import EngineCore
from encore.worker import cuda_graphs
from encore.worker.executor import InprocExecutor
from tests.helpers.tiny_models import make_tiny_model_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama", seed=3)


def prompts(count: int, vocab: int = 320, seed: int = 0) -> list[list[int]]:
    """``count`` random prompts of mixed lengths (5 to ~150 tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(5 + (37 * i) % 150)] for i in range(count)]


def start(path, **overrides) -> EngineCore:
    config = build_config(overrides={"model": str(path), "device": "cuda",
                                     "dtype": "float32", "num_device_blocks": 256,
                                     **overrides})
    core = EngineCore(config, InprocExecutor(config))
    core.start()
    return core


def runner(core: EngineCore):
    return core.executor.worker.runner


def generate(core: EngineCore, batch: list[list[int]], max_tokens: int = MAX_TOKENS,
             tag: str = "r") -> list[list[int]]:
    """Greedy tokens of every prompt, all submitted at once; the engine stepped to the end."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    out: dict[str, list[int]] = {}
    for i, p in enumerate(batch):
        rid = f"{tag}{i}"
        out[rid] = []
        core.add_request(EngineRequest(request_id=rid, prompt_token_ids=p, sampling=params,
                                       arrival_time=time.time()))
    while core.has_work():
        for o in core.step():
            out[o.request_id].extend(o.new_token_ids)
    core.scheduler.check_integrity()
    return [out[f"{tag}{i}"] for i in range(len(batch))]


def test_graphs_are_captured_and_used(tiny_dir):
    core = start(tiny_dir, max_num_seqs=16)
    graphs = runner(core).graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8, 16]
    replays = 0
    real = graphs.run

    def counting(*args):
        nonlocal replays
        replays += 1
        return real(*args)

    graphs.run = counting
    generate(core, prompts(3))
    core.shutdown()
    assert replays >= MAX_TOKENS - 2


def test_greedy_tokens_match_transformers_generate(tiny_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32)
    hf = hf.cuda().eval()
    hf.generation_config.eos_token_id = None
    batch = prompts(6, seed=1)
    core = start(tiny_dir)
    ours = generate(core, batch)
    core.shutdown()
    for p, got in zip(batch, ours, strict=True):
        ids = torch.tensor([p], device="cuda")
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=MAX_TOKENS, pad_token_id=0)[0, len(p):].tolist()
        assert len(ref) >= 8
        assert got[:len(ref)] == ref


def test_batch_invariance_with_chunked_prefill_preemption_and_padding(tiny_dir):
    """One request alone (graph size 1) and inside a pressured batch of 13 (padded to 16)."""
    batch = prompts(13, seed=2)
    core = start(tiny_dir, enable_prefix_caching=False, num_device_blocks=40,
                 block_size=16, max_num_batched_tokens=64, max_num_seqs=16)
    alone = generate(core, [batch[4]], tag="alone")[0]
    together = generate(core, batch, tag="b")
    preemptions = core.scheduler.stats()["preemptions"]
    core.shutdown()
    assert preemptions > 0, "the pool was meant to force a preemption"
    assert [len(t) for t in together] == [MAX_TOKENS] * 13
    assert together[4] == alone


def test_prefix_reuse_gives_the_cold_tokens(tiny_dir):
    rng = random.Random(5)
    prefix = [rng.randrange(3, 320) for _ in range(160)]
    first, second = prefix + [7, 8, 9], prefix + [11, 12, 13, 14]
    cold = start(tiny_dir, enable_prefix_caching=False)
    expected = generate(cold, [second])[0]
    cold.shutdown()
    warm = start(tiny_dir)
    generate(warm, [first], tag="first")
    got = generate(warm, [second], tag="second")[0]
    hits = warm.scheduler.stats()["prefix_hits"]
    warm.shutdown()
    assert hits >= 160 - 16
    assert got == expected


def test_graph_replay_equals_eager_in_bf16(tiny_dir, monkeypatch):
    """Same batch sizes (8 = a captured size), same kernels: bit-identical greedy tokens,
    with context buckets small enough (32..256) that steps use several of them: the batch of
    8 (contexts up to ~180: bucket 256) and one request alone whose context crosses 64."""
    monkeypatch.setattr(cuda_graphs, "SMALLEST_BUCKET", 32)
    batch = prompts(8, seed=4)
    graphed = start(tiny_dir, dtype="bfloat16", max_num_seqs=8)
    graphs = runner(graphed).graphs
    assert graphs.buckets == [32, 64, 128, 256] and len(graphs.graphs) == 4 * 4
    used = set()
    real = graphs.bucket

    def recording(size, context):
        b = real(size, context)
        used.add(b)
        return b

    graphs.bucket = recording
    with_graphs = generate(graphed, batch) + generate(graphed, [batch[1]], tag="alone")
    # One-row kernels (GEMV or cuBLAS, folded or not) are chosen by timing, once per process
    # (ops.GEMV_CHOICE); on this tiny model the timings are within noise, so two engines that
    # timed for themselves could choose differently. "Same kernels": the eager engine reuses
    # the graphed engine's choices, and times nothing new.
    choices = dict(runner(graphed).model.ops.gemv_choice)
    assert choices
    graphed.shutdown()
    assert {64, 256} <= used, used
    eager = start(tiny_dir, dtype="bfloat16", max_num_seqs=8)
    runner(eager).graphs = None
    without = generate(eager, batch) + generate(eager, [batch[1]], tag="alone")
    assert runner(eager).model.ops.gemv_choice == choices
    eager.shutdown()
    assert with_graphs == without


def test_kv_pool_sized_by_profiling(tiny_dir):
    """Without num_device_blocks the pool fills the memory the profile run left."""
    config = build_config(overrides={"model": str(tiny_dir), "device": "cuda",
                                     "dtype": "bfloat16", "gpu_memory_utilization": 0.3})
    ex = InprocExecutor(config)
    ready = ex.start()
    total = torch.cuda.mem_get_info()[1]
    kv_bytes = sum(t.numel() * t.element_size() for t in ex.worker.kv_caches)
    ex.shutdown()
    assert ready.num_device_blocks > 1000
    assert 0.1 * total < kv_bytes < 0.3 * total


@pytest.mark.parametrize("fp8", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_kv_agrees_with_bf16_kv(tiny_dir, fp8):
    """fp8 device KV (Triton kernels, CUDA graphs) against bf16 KV on the same bf16 model:
    greedy agreement (a prefix of each continuation: see below), and a prefix hit on fp8
    blocks reproduces the request's run alone exactly."""
    batch = prompts(8, seed=4)
    ref_core = start(tiny_dir, dtype="bfloat16")
    ref = generate(ref_core, batch)
    ref_core.shutdown()
    core = start(tiny_dir, dtype="bfloat16", kv_cache_dtype=fp8, max_num_seqs=16)
    assert runner(core).kv_caches[0].dtype.itemsize == 1 and runner(core).graphs is not None
    ours = generate(core, batch)
    alone = generate(core, [batch[3]], tag="alone")[0]
    again = generate(core, [batch[3]], tag="again")[0]  # a prefix hit on fp8 blocks
    core.shutdown()
    common = []
    for a, b in zip(ours, ref, strict=True):
        k = 0
        while k < len(a) and a[k] == b[k]:
            k += 1
        common.append(k)
    print(fp8, "greedy common prefix with bf16 KV:", common)
    # a tiny random model's top logits are near ties, which fp8's rounding flips: on an H100
    # (2026-12-06) the common prefixes of 24 were e4m3 [1, 9, 0, 5, 22, 19, 1, 21], e5m2
    # [3, 11, 0, 3, 22, 1, 12, 0]; quality is measured on a real model (test_fp8_kv.py, CPU)
    assert sum(common) / len(common) >= (6 if fp8 == "fp8_e4m3" else 4)
    # alone and again are the same work (both hit prompt 3's 7 full blocks, written by the
    # batch, and compute the rest at batch size 1): exact. Not asserted: alone == ours[3].
    # Inside the batch of 8 (contexts to 177, bucket 256) decode attention reads prompt 3 in
    # splits, alone (bucket 128 for its first 12 steps) in one pass (``_num_splits``), so
    # the fp32 sums round differently, and this tiny model's near ties flip (H100,
    # 2026-12-07: e4m3 diverged at token 5 once the fp8 MMAs ran in fp16; e5m2 did not, nor
    # did e4m3 before). bf16 KV is no different in kind.
    assert alone == again

"""Tensor parallelism on the CPU: two real worker processes in one gloo group.

The split model must be the same function as the whole one: logits of prefill and decode rows
within 1e-4 relative error in fp32 (Llama with llama3 RoPE; Qwen2 with biases, tied
embeddings and a vocabulary the ranks cannot split evenly; Qwen3 with q/k norms and one KV
head, replicated on both ranks), and the same greedy tokens through the engine. The tiers
move each rank's shard (a block counts only when every rank has it), and a rank that dies
fails the requests in flight with a clear error, after which the group comes back.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from encore.configs.loading import build_config
from encore.protocol.client import EngineError
from encore.protocol.executor import MPExecutor
from encore.protocol.messages import EngineRequest, SamplingParams
from encore.scheduler.inproc_client import InprocEngineClient
from encore.worker.executor import InprocExecutor
from tests.helpers import tp_ranks
from tests.helpers.engine_requests import run_request
from tests.helpers.tiny_models import make_tiny_model_dir

pytestmark = pytest.mark.slow

PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57],
           [1, 100, 7, 9, 200, 31, 5], [1, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43,
                                         47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 101]]
FAMILIES = {
    "llama": {},
    "qwen2-odd-vocab": {"vocab_size": 321},
    "qwen3-one-kv-head": {"num_key_value_heads": 1},
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    out = {}
    for name, overrides in FAMILIES.items():
        family = name.split("-")[0]
        out[name] = str(make_tiny_model_dir(tmp_path_factory.mktemp(name), family, seed=3,
                                            **overrides))
    return out


def split_logits(model_dir: str, size: int, tmp: Path, device: str = "cpu") -> np.ndarray:
    """Rank 0's logits from ``size`` rank processes (spawned: nothing inherited)."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init = f"file://{tmp}/rendezvous"
    procs = [ctx.Process(target=tp_ranks.rank_main,
                         args=(r, size, init, model_dir, PROMPTS, results, device))
             for r in range(size)]
    for p in procs:
        p.start()
    try:
        logits = results.get(timeout=120)
    finally:
        for p in procs:
            p.join(timeout=30)
    assert all(p.exitcode == 0 for p in procs)
    return logits


@pytest.mark.parametrize("name", list(FAMILIES))
def test_split_logits_match_the_whole_model(model_dirs, name, tmp_path):
    import torch

    torch.set_num_threads(1)
    whole = tp_ranks.prefill_and_decode_logits(tp_ranks.model_runner(model_dirs[name]),
                                               PROMPTS).numpy()
    split = split_logits(model_dirs[name], 2, tmp_path)
    assert split.shape == whole.shape
    rel = np.abs(split - whole).max() / np.abs(whole).max()
    assert rel < 1e-4, f"relative error {rel:.2e}"
    assert (split.argmax(-1) == whole.argmax(-1)).all()


def engine_config(model_dir: str, **overrides):
    base = {"model": model_dir, "dtype": "float32", "num_device_blocks": 48,
            "max_num_batched_tokens": 256}
    return build_config(overrides={**base, **overrides})


async def generate(client, prompt, rid, max_tokens=12, **kw):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)
    req = EngineRequest(request_id=rid, prompt_token_ids=prompt, sampling=params,
                        arrival_time=time.time())
    return await run_request(client, req)


async def generate_all(config, executor) -> list[list[int]]:
    client = InprocEngineClient(config, executor)
    await client.start()
    try:
        return [t for t, _ in await asyncio.gather(
            *(generate(client, p, f"r{i}") for i, p in enumerate(PROMPTS)))]
    finally:
        await client.shutdown()


def test_engine_greedy_tokens_equal_one_rank(model_dirs):
    one = engine_config(model_dirs["llama"])
    two = engine_config(model_dirs["llama"], tensor_parallel_size=2)
    expected = asyncio.run(generate_all(one, InprocExecutor(one)))
    got = asyncio.run(generate_all(two, MPExecutor(two)))
    assert got == expected


def test_tier_round_trip_with_two_ranks(model_dirs, tmp_path):
    """Host tier within a life, disk tier across a restart: each rank stores and loads its
    shard, and the loaded prefix gives the cold run's tokens."""
    prompts = [[1, *range(10 + 7 * i, 10 + 7 * i + 60)] for i in range(4)]
    config = engine_config(model_dirs["llama"], tensor_parallel_size=2, num_device_blocks=12,
                           host_cache_gib=0.001, disk_cache_dir=str(tmp_path),
                           kv_load_policy="always")

    async def life(first: bool):
        client = InprocEngineClient(config, MPExecutor(config))
        await client.start()
        out = []
        for i, p in enumerate(prompts if first else prompts[:1]):
            out.append(await generate(client, p, f"a{i}"))
        if first:  # prompts[0] was evicted from the device by the others: back from host
            out.append(await generate(client, prompts[0], "again"))
        stats = client.stats()
        await client.shutdown()  # flushes every cached block to disk
        return out, stats

    first, stats = asyncio.run(life(True))
    (cold, cold_cached), *_, (warm, warm_cached) = first
    assert cold_cached == 0 and warm == cold and warm_cached >= 48
    assert stats["kv_tier_transfer_bytes"]["host>device"] > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == \
        ["tp2-rank0", "tp2-rank1"]
    (again, again_cached), = asyncio.run(life(False))[0]
    assert again == cold and again_cached >= 48  # from both ranks' disk shards


def test_a_dead_rank_fails_in_flight_requests_and_the_group_returns(model_dirs):
    config = engine_config(model_dirs["llama"], tensor_parallel_size=2, max_model_len=256)

    async def main():
        executor = MPExecutor(config)
        client = InprocEngineClient(config, executor)
        await client.start()
        before, _ = await generate(client, PROMPTS[0], "before")
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        req = EngineRequest(request_id="victim", prompt_token_ids=PROMPTS[1], sampling=params,
                            arrival_time=time.time())
        seen, error, killed_at, old = 0, None, 0.0, list(executor.pids)
        try:
            async for out in client.generate(req):
                seen += len(out.new_token_ids)
                if seen >= 3 and not killed_at:
                    os.kill(old[1], signal.SIGKILL)
                    killed_at = time.monotonic()
        except EngineError as e:
            error = e
        delay = time.monotonic() - killed_at
        after, _ = await generate(client, PROMPTS[0], "after")
        new = list(executor.pids)
        client.core.scheduler.check_integrity()
        await client.shutdown()
        return before, error, delay, after, old, new

    before, error, delay, after, old, new = asyncio.run(main())
    assert error is not None and "worker rank 1 exited" in str(error)
    assert delay < 5.0
    assert after == before  # a fresh group, the same model
    assert len(new) == 2 and not set(new) & set(old)


def test_chunk_blending_selects_the_same_tokens_on_two_ranks(model_dirs):
    """CacheBlend under TP: the K/V deviation that picks the recomputed tokens is summed over
    both ranks' heads, so the split engine blends exactly like the whole one."""
    from encore.scheduler.engine import EngineCore

    def seq(seed: int, n: int) -> list[int]:
        return [3 + (seed * 37 + 11 * i) % 300 for i in range(n)]

    a, b = seq(1, 21), seq(2, 18)
    first, spans1 = seq(3, 7) + a + b + seq(4, 6), [(7, 28), (28, 46)]
    second, spans2 = seq(5, 5) + b + a + seq(4, 6), [(5, 23), (23, 44)]

    def run(executor_cls, **overrides):
        cfg = engine_config(model_dirs["llama"], chunk_recompute_fraction=0.25, **overrides)
        core = EngineCore(cfg, executor_cls(cfg))
        core.start()
        outs = []
        try:
            for rid, prompt, spans in (("r1", first, spans1), ("r2", second, spans2)):
                params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
                core.add_request(EngineRequest(rid, prompt, params, time.time(),
                                               chunks=spans))
                got, cached = [], 0
                while core.scheduler.has_work():
                    for o in core.step():
                        assert o.error is None, o.error
                        got += o.new_token_ids
                        cached = o.num_cached_tokens
                outs.append((got, cached))
            stats = core.scheduler.stats()
        finally:
            core.shutdown()
        return outs, (stats["chunk_hit_tokens"], stats["chunk_recomputed_tokens"])

    one = run(InprocExecutor)
    two = run(MPExecutor, tensor_parallel_size=2)
    assert two == one
    assert one[1][0] == 39 and one[0][1][1] > 0  # the second request did blend


def test_a_split_the_model_cannot_take_is_a_clear_start_error(model_dirs):
    from encore.protocol.executor import WorkerDiedError

    config = engine_config(model_dirs["llama"], tensor_parallel_size=3)
    executor = MPExecutor(config)
    with pytest.raises(WorkerDiedError, match="tensor_parallel_size=3 does not divide "
                                              "num_attention_heads=4"):
        executor.start()
    assert executor.children == []

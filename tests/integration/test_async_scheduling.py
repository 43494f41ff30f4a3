"""Asynchronous scheduling gives the synchronous path's outputs (CPU, a tiny random Llama).

The same mixed workload runs through ``EngineCore`` with ``async_scheduling`` off and on, in
process and with the worker as a child process: greedy, seeded sampling (n=2), penalties,
logprobs, a stop token that ends a sequence while its next row is in flight, chunked
prefill, preemption (a small pool) and host-tier loads (a second wave of the same prompts
after the device pool has been cycled). Tokens, finish reasons and logprobs must match, and
the asynchronous run must really have planned steps ahead (placeholders were sent).
"""

from __future__ import annotations

import random
import time

import msgspec
import pytest
import torch

from encore.configs.loading import build_config
from encore.protocol.executor import MPExecutor
from encore.protocol.messages import PLACEHOLDER, EngineRequest, SamplingParams
from encore.scheduler.engine import EngineCore
from encore.worker.executor import InprocExecutor
from tests.helpers.tiny_models import make_tiny_model_dir

pytestmark = pytest.mark.slow

BS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("async"), "llama", seed=3)


def workload(stop_id: int | None) -> list[EngineRequest]:
    rng = random.Random(7)
    stems = [[rng.randrange(3, 300) for _ in range(rng.randrange(8, 40))] for _ in range(3)]
    kinds = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=10, n=2,
                       ignore_eos=True),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5,
                       max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=7, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=16,
                       stop_token_ids=[] if stop_id is None else [stop_id]),
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
    ]
    reqs = []
    for i in range(14):
        prompt = stems[i % 3] + [rng.randrange(3, 300) for _ in range(rng.randrange(1, 30))]
        reqs.append(EngineRequest(f"r{i}", prompt, kinds[i % len(kinds)], time.time()))
    return reqs


def run(config, executor_cls, reqs: list[EngineRequest], waves: int = 1, one_by_one=False):
    """Every request (``waves`` times, request ids suffixed), all queued at once per wave
    (``one_by_one``: each after the last has finished); returns {(rid, index): (tokens,
    finish reason, logprobs)}, the steps sent, the stats."""
    core = EngineCore(config, executor_cls(config))
    core.start()
    sent = []
    submit = core.executor.submit

    def recording(step, masks=None):
        sent.append(step)
        submit(step, masks)

    core.executor.submit = recording  # type: ignore[method-assign]
    got: dict = {}
    wants_lps = {f"{r.request_id}w{w}" for r in reqs for w in range(waves)
                 if r.sampling.logprobs is not None}
    try:
        groups = [[r] for r in reqs] if one_by_one else [reqs]
        for wave, group in ((w, g) for w in range(waves) for g in groups):
            for r in group:
                assert not core.add_request(msgspec.structs.replace(
                    r, request_id=f"{r.request_id}w{wave}", arrival_time=time.time()))
            while core.has_work():
                for o in core.step():
                    assert o.error is None, o.error
                    tokens, _, lps = got.setdefault((o.request_id, o.index), ([], [None], []))
                    tokens += o.new_token_ids
                    if o.request_id in wants_lps:  # (others get them beside such a row)
                        lps += [(lp.token_id, lp.logprob) for lp in o.logprobs or []]
                    if o.finish_reason is not None:
                        got[o.request_id, o.index][1][0] = o.finish_reason
                core.scheduler.check_integrity()
        assert core.scheduler.kv.pool.usage == 0.0
        return got, sent, core.scheduler.snapshot()
    finally:
        core.shutdown()


def same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        (ta, fa, la), (tb, fb, lb) = a[key], b[key]
        assert (ta, fa) == (tb, fb), key
        assert [t for t, _ in la] == [t for t, _ in lb], key
        assert [v for _, v in la] == pytest.approx([v for _, v in lb], abs=1e-4), key


GPU = [pytest.mark.gpu,
       pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize(("executor_cls", "device"), [
    pytest.param(InprocExecutor, "cpu", id="inproc-cpu"),
    pytest.param(MPExecutor, "cpu", id="process-cpu"),
    pytest.param(InprocExecutor, "cuda", id="inproc-cuda", marks=GPU),  # triton, CUDA graphs
    pytest.param(MPExecutor, "cuda", id="process-cuda", marks=GPU),
])
def test_async_equals_sync_under_pressure_with_tier_loads(model_dir, executor_cls, device):
    def config(async_scheduling: bool):
        return build_config(overrides={
            "model": str(model_dir), "dtype": "float32", "block_size": BS, "device": device,
            "num_device_blocks": 48, "max_num_batched_tokens": 40, "max_num_seqs": 6,
            "host_cache_gib": 0.002, "kv_load_policy": "always",
            "async_scheduling": async_scheduling})

    probe, _, _ = run(config(False), InprocExecutor, workload(None)[4:5])
    stop_id = probe["r4w0", 0][0][3]  # r4 stops on its fourth token (or an earlier copy)
    reqs = workload(stop_id)
    want, sync_steps, sync_stats = run(config(False), InprocExecutor, reqs, waves=2)
    got, steps, stats = run(config(True), executor_cls, reqs, waves=2)
    same(got, want)
    assert not any(PLACEHOLDER in s.token_ids for step in sync_steps for s in step.seqs)
    ahead = sum(PLACEHOLDER in s.token_ids for step in steps for s in step.seqs)
    assert ahead > 20, ahead  # decodes were planned before their tokens came back
    assert all(step.defer_output for step in steps)
    # the workload exercised what it claims to, in both runs
    for s in (sync_stats, stats):
        assert s["preemptions"] > 0
        assert s["kv_tier_hit_tokens"]["host"] > 0
    assert any(f == "stop" for _, (_, (f,), _) in got.items())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_async_equals_sync_with_chunk_blending(model_dir, device):
    """Prompts assembled from cached chunks in other orders (CacheBlend): the same tokens
    and logprobs with the step ahead planned before the blended step's token is back."""
    rng = random.Random(5)
    docs = [[rng.randrange(3, 300) for _ in range(17)] for _ in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, ignore_eos=True)
    reqs = []
    for r in range(6):
        head = [rng.randrange(3, 300) for _ in range(5)]
        prompt = head + [t for j in range(3) for t in docs[(r + j) % 4]] + [7, 8, 9]
        spans = [(5 + 17 * j, 22 + 17 * j) for j in range(3)]
        reqs.append(EngineRequest(f"b{r}", prompt, params, time.time(), chunks=spans))

    def config(async_scheduling: bool):
        return build_config(overrides={
            "model": str(model_dir), "dtype": "float32", "block_size": BS, "device": device,
            "num_device_blocks": 128, "chunk_recompute_fraction": 0.25,
            "async_scheduling": async_scheduling})

    want, _, sync_stats = run(config(False), InprocExecutor, reqs, one_by_one=True)
    got, steps, stats = run(config(True), InprocExecutor, reqs, one_by_one=True)
    same(got, want)
    assert sync_stats["chunk_hit_tokens"] == stats["chunk_hit_tokens"] > 0
    assert any(s.blend is not None for step in steps for s in step.seqs)
    assert any(PLACEHOLDER in s.token_ids for step in steps for s in step.seqs)

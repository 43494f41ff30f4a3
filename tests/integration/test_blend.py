"""Chunk reuse by blending (CacheBlend) on a tiny random Llama in fp32, CPU.

Worker level: hand-built steps against one ModelRunner, comparing KV and logprobs of a blended
prompt with a full prefill. Engine level: the scheduler's chunk store, cached_tokens and the
chunk counters, with integrity checks.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from encore.configs.loading import build_config
from encore.protocol.messages import (
    BlendChunk,
    BlendPlan,
    EngineRequest,
    SamplingParams,
    ScheduledSeq,
    SchedulerOutput,
)
from encore.scheduler.engine import EngineCore
from encore.worker.executor import InprocExecutor
from encore.worker.model_runner import ModelRunner
from tests.helpers.tiny_models import make_tiny_model_dir

BS = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("blend"), "llama", seed=5,
                               num_hidden_layers=4)


def config(model_dir, **overrides):
    return build_config(overrides={"model": str(model_dir), "dtype": "float32",
                                   "block_size": BS, "num_device_blocks": 128, **overrides})


GPU = [pytest.mark.gpu,
       pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module", params=[
    pytest.param(("cpu", "torch"), id="cpu-torch"),
    pytest.param(("cuda", "triton"), id="cuda-triton", marks=GPU),
])
def runner(model_dir, request):
    device, backend = request.param
    return ModelRunner(config(model_dir, device=device, attention_backend=backend,
                              enforce_eager=True))


def tokens(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n,), generator=g).tolist()


class Blocks:
    """Hands out disjoint block ids of the runner's pool."""

    def __init__(self) -> None:
        self.next = 1

    def take(self, num_tokens: int) -> list[int]:
        n = math.ceil(num_tokens / BS)
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def run(runner, step_id: int, seqs: list[ScheduledSeq]):
    return runner.execute(SchedulerOutput(step_id=step_id, seqs=seqs))


def full_prefill(runner, blocks: Blocks, prompt: list[int], sid: str):
    table = blocks.take(len(prompt))
    out = run(runner, 1, [ScheduledSeq(sid, prompt, 0, table, True, GREEDY, prompt)])
    return table, out


def blended(runner, blocks: Blocks, prompt: list[int], spans, recompute: float, sid: str,
            check_layer: int = 1):
    """Store each chunk standalone, then blend the prompt from them, in one step."""
    stores, chunks = [], []
    for i, (s, e) in enumerate(spans):
        chunk_blocks = blocks.take(e - s)
        stores.append(ScheduledSeq(f"{sid}/c{i}", prompt[s:e], 0, chunk_blocks, False,
                                   store_only=True))
        chunks.append(BlendChunk(s, e - s, chunk_blocks, math.ceil(recompute * (e - s))))
    table = blocks.take(len(prompt))
    seq = ScheduledSeq(sid, prompt, 0, table, True, GREEDY, prompt,
                       blend=BlendPlan(chunks, check_layer))
    return table, run(runner, 2, [*stores, seq])


def kv_of(runner, table: list[int], n: int) -> list[torch.Tensor]:
    return [c[:, table].flatten(1, 2)[:, :n].clone() for c in runner.kv_caches]


def top_logprobs(out) -> dict[int, float]:
    lp = out.logprobs[-1]
    return {t.token_id: t.logprob for t in lp.top}


def test_full_recompute_equals_full_prefill(runner):
    prompt = tokens(1, 10) + tokens(2, 23) + tokens(3, 6) + tokens(4, 17) + tokens(5, 5)
    spans = [(10, 33), (39, 56)]
    blocks = Blocks()
    full_table, full = full_prefill(runner, blocks, prompt, "full")
    want_kv = kv_of(runner, full_table, len(prompt))
    blend_table, out = blended(runner, blocks, prompt, spans, 1.0, "b100")
    got_kv = kv_of(runner, blend_table, len(prompt))
    for want, got in zip(want_kv, got_kv, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert out.sampled_token_ids == full.sampled_token_ids
    want_lp, got_lp = top_logprobs(full), top_logprobs(out)
    assert want_lp.keys() == got_lp.keys()
    for t in want_lp:
        assert abs(want_lp[t] - got_lp[t]) < 1e-4


def test_chunk_first_blends_like_prefix_reuse(runner):
    """A chunk at position 0 with nothing before it: its standalone KV is the in-context KV,
    so blending without any recompute equals reusing it as a prefix."""
    prompt = tokens(6, 24) + tokens(7, 9)
    blocks = Blocks()
    full_table, full = full_prefill(runner, blocks, prompt, "full0")
    blend_table, out = blended(runner, blocks, prompt, [(0, 24)], 0.0, "b0")
    for want, got in zip(kv_of(runner, full_table, len(prompt)),
                         kv_of(runner, blend_table, len(prompt)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert out.sampled_token_ids == full.sampled_token_ids
    assert out.chunk_deviation["b0"][0] < 1e-5  # nothing to deviate from


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_partial_recompute_triton_matches_torch_backend(model_dir):
    """Kept rows attend through the triton prefill kernel with explicit query positions: the
    same KV and logprobs as the torch backend on the same GPU."""
    runner = ModelRunner(config(model_dir, device="cuda", attention_backend="triton",
                                enforce_eager=True))
    prompt = tokens(21, 9) + tokens(22, 26) + tokens(23, 5) + tokens(24, 19) + tokens(25, 6)
    spans = [(9, 35), (40, 59)]
    table, out = blended(runner, Blocks(), prompt, spans, 0.25, "bp")
    ref = ModelRunner(config(model_dir, device="cuda", attention_backend="torch"))
    ref_table, ref_out = blended(ref, Blocks(), prompt, spans, 0.25, "bp")
    for want, got in zip(kv_of(ref, ref_table, len(prompt)), kv_of(runner, table, len(prompt)),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert out.sampled_token_ids == ref_out.sampled_token_ids
    for t, lp in top_logprobs(ref_out).items():
        assert abs(top_logprobs(out)[t] - lp) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kept_row_graphs_match_eager(model_dir):
    """With CUDA graphs on, the layers after the check layer replay a captured graph (padded
    rows): the same KV and logprobs as the eager loop, twice (capture, then replay)."""
    graphed = ModelRunner(config(model_dir, device="cuda", attention_backend="triton"))
    eager = ModelRunner(config(model_dir, device="cuda", attention_backend="triton",
                               enforce_eager=True))
    for trial in range(2):
        prompt = tokens(30 + trial, 7) + tokens(32, 25) + tokens(33, 4) + tokens(34, 22)
        spans = [(7, 32), (36, 58)]
        table, out = blended(graphed, Blocks(), prompt, spans, 0.3, f"g{trial}")
        ref_table, ref_out = blended(eager, Blocks(), prompt, spans, 0.3, f"g{trial}")
        for want, got in zip(kv_of(eager, ref_table, len(prompt)),
                             kv_of(graphed, table, len(prompt)), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert out.sampled_token_ids == ref_out.sampled_token_ids
    runtime = graphed.blend_runtime
    assert runtime is not None and runtime.graphs is not None and runtime.graphs.graphs


def test_partial_recompute_keeps_cached_kv_and_measures_deviation(runner):
    """At 0% past the check layer the chunk K/V are the re-rotated standalone ones (layers
    after the check layer); the deviation is reported per chunk."""
    prompt = tokens(8, 12) + tokens(9, 20) + tokens(10, 7)
    blocks = Blocks()
    blend_table, out = blended(runner, blocks, prompt, [(12, 32)], 0.0, "bnaive")
    # the standalone chunk, re-rotated by 12, equals RoPE at the new positions: compare with
    # a standalone prefill of the chunk placed at position 12 of a zero-attention world is
    # not possible, so check the copy: V of the last layer equals the standalone V.
    chunk_table = list(range(1, 1 + math.ceil(20 / BS)))
    last = runner.kv_caches[-1].cpu()
    v_chunk = last[1, chunk_table].flatten(0, 1)[:20]
    v_blend = last[1, blend_table].flatten(0, 1)[12:31]  # the last token is recomputed
    torch.testing.assert_close(v_blend, v_chunk[:19])
    (dev,) = out.chunk_deviation["bnaive"]
    assert dev > 1e-3  # the context changed the chunk's K/V


def test_moved_chunk_keys_equal_keys_computed_at_the_new_position(runner):
    """Layer 0's K of a token depends only on the token and its position: the stored chunk's
    layer-0 keys, moved by the blend's copy, equal those of a full prefill at the new place."""
    from encore.worker.blend import ChunkCopy

    prompt = tokens(43, 9) + tokens(44, 14) + tokens(45, 3)
    blocks = Blocks()
    full_table, _ = full_prefill(runner, blocks, prompt, "full-k")
    chunk_blocks = blocks.take(14)
    run(runner, 3, [ScheduledSeq("store-k", prompt[9:23], 0, chunk_blocks, False,
                                 store_only=True)])
    table = blocks.take(len(prompt))
    dev = runner.kv_caches[0].device
    t = torch.tensor(table, device=dev)
    pos = torch.arange(len(prompt), device=dev)
    slots = t[pos // BS] * BS + pos % BS
    plan = BlendPlan([BlendChunk(9, 14, chunk_blocks, 0)], 1)
    ChunkCopy(runner.model, plan, slots, 0, BS, None)(runner.kv_caches, 0, 1)
    got = runner.kv_caches[0][0, table].flatten(0, 1)[9:23]
    want = runner.kv_caches[0][0, full_table].flatten(0, 1)[9:23]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_naive_reuse_keeps_the_stored_chunk_in_every_layer(runner):
    """Check layer -1: nothing of the chunk is recomputed; its K/V in every layer are the
    stored ones moved to the new position (V unchanged), the other rows are computed."""
    prompt = tokens(40, 6) + tokens(41, 16) + tokens(42, 5)
    blocks = Blocks()
    blend_table, out = blended(runner, blocks, prompt, [(6, 22)], 0.0, "naive", check_layer=-1)
    chunk_table = list(range(1, 1 + 16 // BS))
    for cache in runner.kv_caches:
        cache = cache.cpu()
        v_chunk = cache[1, chunk_table].flatten(0, 1)[:16]
        torch.testing.assert_close(cache[1, blend_table].flatten(0, 1)[6:22], v_chunk)
    assert out.chunk_deviation["naive"] == [] and len(out.sampled_token_ids) == 1


def engine(model_dir, **overrides) -> EngineCore:
    cfg = config(model_dir, **overrides)
    core = EngineCore(cfg, InprocExecutor(cfg))
    core.start()
    return core


def complete(core: EngineCore, rid: str, prompt: list[int], spans=(), recompute=None):
    req = EngineRequest(rid, prompt, GREEDY, time.time(), chunks=list(spans),
                        chunk_recompute=recompute)
    outs = core.add_request(req)
    assert not outs
    tokens_out, cached = [], 0
    while core.scheduler.has_work():
        for o in core.step():
            assert o.error is None, o.error
            tokens_out += o.new_token_ids
            cached = o.num_cached_tokens
        core.scheduler.check_integrity()
    return tokens_out, cached


def test_engine_stores_chunks_and_blends_them_in_any_order(model_dir):
    core = engine(model_dir, chunk_recompute_fraction=0.25)
    a, b, c = tokens(11, 21), tokens(12, 18), tokens(13, 13)
    head, question = tokens(14, 7), tokens(15, 6)
    first = head + a + b + c + question
    spans1 = [(7, 28), (28, 46), (46, 59)]
    _, cached = complete(core, "r1", first, spans1)
    assert cached == 0  # every chunk was computed (stored) by this request
    stats = core.scheduler.stats()
    assert stats["chunk_queries"] == 3 and stats["chunk_hit_tokens"] == 0
    # the same documents in another order, after other text: all three hit
    second = tokens(16, 5) + c + a + b + question
    spans2 = [(5, 18), (18, 39), (39, 57)]
    _, cached = complete(core, "r2", second, spans2)
    recomputed = sum(math.ceil(0.25 * n) for n in (13, 21, 18))
    assert cached == 13 + 21 + 18 - recomputed
    stats = core.scheduler.stats()
    assert (stats["chunk_queries"], stats["chunk_hit_tokens"]) == (3, 52)
    assert stats["chunk_recomputed_tokens"] == recomputed
    # a full recompute blends to the full-prefill answer (blended first: its blocks past the
    # first chunk are never prefix-registered, so the plain run cannot reuse them)
    got, _ = complete(core, "r3", second, spans2, recompute=1.0)
    want, cached = complete(core, "plain", second)
    assert cached == (5 // BS) * BS and got == want  # only the preamble block is shared
    core.scheduler.check_integrity()
    assert core.scheduler.kv.pool.usage == 0.0  # nothing held after the requests


def test_engine_blend_under_pressure_never_leaks(model_dir):
    """A pool too small for everything: requests wait or evict chunks, never leak blocks."""
    core = engine(model_dir, num_device_blocks=40, max_num_seqs=4)
    docs = [tokens(20 + i, 17) for i in range(4)]
    for r in range(6):
        order = [docs[(r + j) % 4] for j in range(3)]
        prompt = tokens(40 + r, 5) + [t for d in order for t in d] + tokens(50 + r, 4)
        spans = [(5 + 17 * j, 22 + 17 * j) for j in range(3)]
        req = EngineRequest(f"p{r}", prompt, GREEDY, time.time(), chunks=spans)
        assert not core.add_request(req)
    done = 0
    while core.scheduler.has_work():
        done += sum(o.finish_reason is not None for o in core.step())
        core.scheduler.check_integrity()
    assert done == 6
    assert core.scheduler.kv.pool.usage == 0.0


def test_engine_loads_evicted_chunks_back_from_the_host_tier(model_dir):
    """Chunk blocks evicted from a small device pool are written back to the host tier and
    loaded from there (not recomputed) when a later prompt uses the chunks again; the answer
    equals the one blended from device-resident chunks."""
    docs = [tokens(60 + i, 17) for i in range(3)]
    first = tokens(70, 5) + docs[0] + docs[1] + docs[2] + tokens(71, 4)
    second = tokens(72, 6) + docs[2] + docs[0] + docs[1] + tokens(73, 4)
    spans1 = [(5, 22), (22, 39), (39, 56)]
    spans2 = [(6, 23), (23, 40), (40, 57)]
    roomy = engine(model_dir)
    complete(roomy, "a1", first, spans1)
    want, want_cached = complete(roomy, "a2", second, spans2)

    # kv_load_policy "always": the cost model would recompute chunks this tiny instead
    tight = engine(model_dir, num_device_blocks=48, host_cache_gib=0.001,
                   kv_load_policy="always")
    complete(tight, "b1", first, spans1)
    for i in range(3):  # distinct prompts push every chunk block out of the device pool
        complete(tight, f"flood{i}", tokens(80 + i, 150))
    tight.scheduler.stats()  # reset the increments
    got, cached = complete(tight, "b2", second, spans2)
    stats = tight.scheduler.stats()
    assert stats["kv_tier_hit_tokens"].get("host", 0) >= 3 * 16  # chunk blocks came from host
    assert stats["chunk_hit_tokens"] == 51
    assert (got, cached) == (want, want_cached)

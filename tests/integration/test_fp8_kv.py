"""fp8 device KV (``cache.kv_cache_dtype``) through the engine on the CPU (the torch backend;
the Triton kernels' fp8 paths are in ``tests/kernels/test_fp8_kv.py``, the GPU engine in
``test_gpu_engine.py``).

Quality against the model's dtype on the embedded SmolLM2 (chat prompts: next-token
log-probability error, top-1 and greedy agreement; ``bench/quant_quality.py --kv``); the pool
holds twice the blocks of a bf16 pool in the same memory; fp8 blocks round-trip through the
host and disk tiers byte for byte (a hit gives the cold run's tokens), and a disk file written
by an fp8 server is a miss (not a bad file) for a server of the model's dtype; chunk blending
on an fp8 cache with every chunk token recomputed gives the plain prefill's tokens.
"""

from __future__ import annotations

import asyncio

import pytest

from bench.quant_quality import compare
from encore.configs.fields import ConfigError
from encore.configs.loading import build_config
from encore.worker.model_runner import ModelRunner
from tests.integration.test_blend import complete, model_dir, tokens  # noqa: F401 (fixture)
from tests.integration.test_blend import engine as blend_engine
from tests.integration.test_kv_tiers_engine import (  # noqa: F401 (fixture)
    BLOCK_GIB,
    life_after_restart,
    life_to_disk,
    long_prompts,
    tokenizer,
)

pytestmark = pytest.mark.slow


def test_fp8_kv_stays_close_to_the_model_dtype():
    res = compare({"auto": {}, "fp8_e4m3": {"kv_cache_dtype": "fp8_e4m3"},
                   "fp8_e5m2": {"kv_cache_dtype": "fp8_e5m2"}}, n=24)
    print(res)
    for name, (top1, mean, worst) in {"fp8_e4m3": (0.75, 0.2, 0.5),
                                      "fp8_e5m2": (0.75, 0.3, 0.8)}.items():
        r = res[name]
        # every clear top-1 kept; the others lead by one bf16 step or less (ties)
        assert r["top1_clear_prompts"] >= 5 and r["top1_agreement_clear"] == 1.0, (name, r)
        assert r["top1_agreement"] >= top1, (name, r)
        assert r["next_token_abs_logprob_err_mean"] < mean, (name, r)
        assert r["next_token_abs_logprob_err_max"] < worst, (name, r)


def test_fp8_pool_holds_twice_the_bf16_blocks():
    base = {"dtype": "bfloat16", "kv_cache_gib": 0.05}
    bf16 = ModelRunner(build_config(overrides=base)).num_blocks
    fp8 = ModelRunner(build_config(overrides={**base, "kv_cache_dtype": "fp8_e4m3"}))
    assert fp8.num_blocks in (2 * bf16, 2 * bf16 + 1)  # the same bytes, floored
    assert fp8.kv_caches[0].dtype.itemsize == 1


def test_fp8_with_a_tier_codec_is_refused():
    with pytest.raises(ConfigError, match="not supported"):
        build_config(overrides={"kv_cache_dtype": "fp8_e4m3", "tier_kv_codec": "int8"})


def test_fp8_blocks_round_trip_host_and_disk_and_miss_for_another_dtype(
        tokenizer, tmp_path):  # noqa: F811 (fixture)
    ps = long_prompts(tokenizer, 6)
    fp8 = {"kv_cache_dtype": "fp8_e4m3", "host_cache_gib": 16 * BLOCK_GIB}
    # ps[0] pushed out again, to disk (default write-back), before the restart
    (cold, warm, cached), stats = asyncio.run(life_to_disk(tmp_path, ps, **fp8))
    assert warm == cold and cached >= 10 * 16
    assert stats["kv_tier_transfer_bytes"]["device>host"] > 0
    out, cached, stats = asyncio.run(life_after_restart(tmp_path, ps[0], **fp8))
    assert out == cold and cached >= 10 * 16 and stats["kv_tier_hit_tokens"]["disk"] >= cached
    # a server of the model's dtype: fp8 files are another layout of the model, a miss (the
    # scan drops them as retired), not a bad file
    out, cached, stats = asyncio.run(life_after_restart(tmp_path, ps[0],
                                                       host_cache_gib=4 * BLOCK_GIB))
    assert cached == 0 and stats["kv_disk_corrupt_files"] == 0


def test_blending_on_an_fp8_cache(model_dir):  # noqa: F811 (fixture)
    core = blend_engine(model_dir, kv_cache_dtype="fp8_e4m3")
    a, b, question = tokens(11, 21), tokens(12, 18), tokens(15, 6)
    first = tokens(14, 7) + a + b + question
    complete(core, "r1", first, [(7, 28), (28, 46)])
    second = tokens(16, 5) + b + a + question
    spans = [(5, 23), (23, 44)]
    got, _ = complete(core, "r2", second, spans, recompute=1.0)
    want, _ = complete(core, "plain", second)
    assert got == want
    _, cached = complete(core, "r3", second, spans, recompute=0.25)
    assert cached > 0
    core.scheduler.check_integrity()
    core.shutdown()

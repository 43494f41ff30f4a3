"""The KV tiers on a CUDA GPU: pinned host pool, side-stream copies completing through events,
disk and remote I/O in threads. A tiny random Llama (built here); greedy tokens after a host,
disk or remote hit must equal the cold run's (remote: a real redis-server, on PATH). Run with
``pytest -m gpu tests/integration/test_kv_tiers_gpu.py``.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from encore.configs.loading import build_config
from encore.protocol.messages import EngineRequest, SamplingParams
from encore.scheduler.engine import EngineCore
from encore.worker.executor import InprocExecutor
from tests.e2e.redis_server import start_store, stop_store
from tests.helpers.tiny_models import make_tiny_model_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama", seed=3)


def run(core: EngineCore, prompt: list[int], rid: str) -> tuple[list[int], int]:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    core.add_request(EngineRequest(rid, prompt, params, arrival_time=time.time()))
    tokens, cached = [], 0
    while core.has_work():
        for o in core.step():
            tokens.extend(o.new_token_ids)
            cached = o.num_cached_tokens
        core.scheduler.check_integrity()
    return tokens, cached


@pytest.mark.parametrize("tiers", ["host", "disk", "remote"])
def test_tier_hit_on_gpu_equals_cold_run(tiny_dir, tmp_path, tiers):
    store = start_store(tmp_path / "store") if tiers == "remote" else None
    try:
        _hit_equals_cold_run(tiny_dir, tmp_path, tiers, store.url if store else None)
    finally:
        if store is not None:
            stop_store(store)


def _hit_equals_cold_run(tiny_dir, tmp_path, tiers: str, url: str | None) -> None:
    core = EngineCore(*_config(tiny_dir, tmp_path, tiers, url))
    info = core.start()
    assert core.worker is not None and core.worker.kv_block_bytes > 0
    rng = random.Random(1)
    ps = [[rng.randrange(3, 300) for _ in range(100)] for _ in range(6)]
    cold, cached = run(core, ps[0], "cold")
    assert cached == 0
    for i, p in enumerate(ps[1:]):
        run(core, p, f"fill{i}")
    warm, cached = run(core, ps[0], "warm")
    stats = core.scheduler.stats()
    core.shutdown()
    assert info.device.startswith("cuda")
    assert warm == cold and cached >= 64
    assert stats["kv_tier_hit_tokens"].get(tiers, 0) > 0


def _config(path, tmp_path, tiers, url=None):
    over = {"model": str(path), "device": "cuda", "dtype": "float32", "num_device_blocks": 24,
            "kv_load_policy": "always"}
    if tiers == "host":
        over["host_cache_gib"] = 0.05
    elif tiers == "disk":
        over.update(host_cache_gib=0.0, disk_cache_dir=str(tmp_path / "kv"))
    else:
        over.update(host_cache_gib=0.0, remote_cache_url=url)
    config = build_config(overrides=over)
    return config, InprocExecutor(config)

"""Host and disk KV tiers with the real model (SmolLM2, fp32, CPU) and real files.

A small device pool is filled past capacity with distinct long prompts; the first prompt,
repeated, must come back from the host tier (or, with a tiny host, from disk; or from disk
after a restart) with the same greedy tokens as its cold run. Damaged files are detected,
deleted and counted, and never change an answer.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from encore.configs.loading import build_config
from encore.configs.secrets import block_key_secret
from encore.configs.types import CacheConfig
from encore.kvmanager.hashing import BlockHasher
from encore.protocol.messages import EngineRequest, SamplingParams
from encore.scheduler.inproc_client import InprocEngineClient
from encore.server.tokenizer import load_tokenizer
from encore.worker.executor import InprocExecutor
from encore.worker.loader import default_gguf_path
from encore.worker.tiers.disk_files import HEADER, DiskStore
from tests.helpers.engine_requests import run_request

pytestmark = pytest.mark.slow

BLOCK_GIB = 737_280 / 1024**3  # one SmolLM2 block (30 layers, 3 KV heads, dim 64, fp32)
WORDS = [
    "river", "stone", "lantern", "orchard", "copper", "violin", "meadow", "harbor", "thunder",
    "velvet", "quiet", "marble", "sparrow", "canyon", "ember", "glacier",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(default_gguf_path()))


def long_prompts(tokenizer, count: int, words: int = 150) -> list[list[int]]:
    """Distinct ~200-token prompts (they differ from their first token on)."""
    out = []
    for i in range(count):
        text = f"Story {i}: " + " ".join(WORDS[(i * 7 + j * (i + 3)) % len(WORDS)]
                                         for j in range(words))
        out.append(tokenizer.encode(text))
    return out


def engine(tmp: Path | None = None, **overrides) -> InprocEngineClient:
    base = {"dtype": "float32", "num_device_blocks": 40, "max_num_batched_tokens": 512,
            "kv_load_policy": "always"}
    if tmp is not None:
        base["disk_cache_dir"] = str(tmp)
    config = build_config(overrides={**base, **overrides})
    return InprocEngineClient(config, InprocExecutor(config))


async def generate(client, prompt: list[int], rid: str) -> tuple[list[int], int]:
    params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0)
    req = EngineRequest(request_id=rid, prompt_token_ids=prompt, sampling=params,
                        arrival_time=time.time())
    return await run_request(client, req)


async def settle_and_check(client) -> None:
    """Wait until no transfer is in flight, then check every invariant of every tier."""
    sched = client.core.scheduler
    deadline = time.monotonic() + 30
    while sched.has_work() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    sched.check_integrity()
    tiers = sched.kv.tiers
    assert tiers is not None and tiers.num_inflight == 0
    for t in tiers.tiers.values():
        assert t.num_busy() == 0


async def fill_then_repeat(client, ps: list[list[int]]) -> tuple[list[int], list[int], int]:
    """Cold run of ps[0], the others (evicting it from the device), then ps[0] again."""
    cold, cached = await generate(client, ps[0], "cold")
    assert cached == 0
    for i, p in enumerate(ps[1:]):
        await generate(client, p, f"fill{i}")
    warm, cached = await generate(client, ps[0], "again")
    await settle_and_check(client)
    return cold, warm, cached


async def life_to_disk(tmp: Path, ps: list[list[int]], **overrides):
    """A server's life: ``fill_then_repeat``, then ps[1:] again to push ps[0] out to disk
    before the restart; returns (cold, warm, cached) and the stats."""
    client = engine(tmp, **overrides)
    await client.start()
    result = await fill_then_repeat(client, ps)
    for i, p in enumerate(ps[1:]):
        await generate(client, p, f"refill{i}")
    await settle_and_check(client)
    stats = client.stats()
    await client.shutdown()
    return result, stats


async def life_after_restart(tmp: Path, prompt: list[int], **overrides):
    """A later life over the same disk tier: ``prompt`` once; (tokens, cached, stats)."""
    client = engine(tmp, **overrides)
    await client.start()
    tokens, cached = await generate(client, prompt, "after-restart")
    await settle_and_check(client)
    stats = client.stats()
    await client.shutdown()
    return tokens, cached, stats


def test_host_tier_brings_back_evicted_prefix(tokenizer):
    ps = long_prompts(tokenizer, 5)

    async def main():
        client = engine(host_cache_gib=80 * BLOCK_GIB)
        await client.start()
        result = await fill_then_repeat(client, ps)
        stats = client.stats()
        await client.shutdown()
        return result, stats

    (cold, warm, cached), stats = asyncio.run(main())
    assert warm == cold
    assert cached >= 10 * 16
    assert stats["kv_tier_hit_tokens"]["host"] >= cached - stats["kv_tier_hit_tokens"]["device"]
    assert stats["kv_tier_transfer_bytes"]["device>host"] > 0
    assert stats["kv_tier_transfer_bytes"]["host>device"] > 0
    # per loading request: the copies' measured time, within its wait for them
    moved, waited = stats["kv_tier_transfer_seconds"], stats["kv_tier_load_seconds"]
    assert sum(moved.counts) == sum(waited.counts) > 0
    assert 0 < moved.sum <= waited.sum


def test_disk_tier_behind_a_tiny_host_survives_a_restart(tokenizer, tmp_path):
    ps = long_prompts(tokenizer, 6)
    tiny_host = 4 * BLOCK_GIB
    (cold, warm, cached), stats = asyncio.run(life_to_disk(tmp_path, ps, host_cache_gib=tiny_host))
    assert warm == cold and cached >= 10 * 16
    assert stats["kv_tier_hit_tokens"].get("disk", 0) > 0
    assert stats["kv_tier_transfer_bytes"]["host>disk"] > 0
    tokens, cached, stats = asyncio.run(life_after_restart(tmp_path, ps[0],
                                                           host_cache_gib=tiny_host))
    assert tokens == cold
    assert cached >= 10 * 16 and stats["kv_tier_hit_tokens"]["disk"] >= cached


def test_damaged_files_are_misses_deleted_and_counted(tokenizer, tmp_path):
    """Flip a payload byte (caught at load), truncate one and swap the model fingerprint of
    another (caught by the start-up scan): answers stay those of a cold run."""
    ps = long_prompts(tokenizer, 6)

    async def life(name: str):
        client = engine(tmp_path, host_cache_gib=0.0, cache_write_policy="write_through")
        await client.start()
        tokens, cached = await generate(client, ps[0], name)
        await settle_and_check(client)
        stats = client.stats()
        await client.shutdown()
        return tokens, cached, stats

    cold, _, _ = asyncio.run(life("first"))
    hasher = BlockHasher(block_key_secret(CacheConfig(disk_cache_dir=str(tmp_path))))
    keys = hasher.prefix_keys(ps[0], 16, None)
    paths = [DiskStore(tmp_path, b"x" * 32, 1, b"k" * 32).path(k) for k in keys]
    assert all(p.exists() for p in paths), "write-through put every full block on disk"
    data = bytearray(paths[1].read_bytes())
    data[HEADER.size + 5] ^= 0xFF
    paths[1].write_bytes(bytes(data))
    paths[3].write_bytes(paths[3].read_bytes()[:-1000])
    data = bytearray(paths[5].read_bytes())
    data[12:44] = b"\x00" * 32  # the fingerprint field: another model's file
    paths[5].write_bytes(bytes(data))
    tokens, cached, stats = asyncio.run(life("second"))
    assert tokens == cold
    assert cached == 16, "block 0 loads; block 1 is corrupt, so the rest is recomputed"
    assert stats["kv_disk_corrupt_files"] == 3
    # each bad file was deleted, then written again (whole) after its block was recomputed
    for p in (paths[1], paths[3], paths[5]):
        fresh = p.read_bytes()
        assert len(fresh) == HEADER.size + 737_280 and fresh[12:44] != b"\x00" * 32

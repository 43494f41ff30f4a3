"""TTL pins through the real engine (in-process, a tiny random Llama on CPU, fp32).

Turn 1 of a program ends with a pin; a flood of distinct prompts then cycles the small device
pool; turn 2 (turn 1's prompt + output + new text) must still find turn 1's prompt blocks on
the device. With pins off the same flood evicts them. Likewise an explicit breakpoint pin
keeps a prefix across a program's last step.

    pool: 23 usable blocks of 8 tokens
    turn 1: 40-token prompt (5 blocks) + 8 output tokens   -> pin of 5 blocks
    flood:  4 x 72-token prompts (10 blocks each)           -> evicts every unpinned block
    turn 2: turn 1's 48 tokens + 8 new                      -> 40 cached tokens (pinned)
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import msgspec
import pytest

from encore.configs.loading import build_config
from encore.protocol.messages import EngineRequest, SamplingParams
from encore.scheduler.inproc_client import InprocEngineClient
from encore.worker.executor import InprocExecutor
from tests.helpers.engine_requests import run_request
from tests.helpers.tiny_models import make_tiny_model_dir

pytestmark = pytest.mark.slow

BS = 8
PROMPT_BLOCKS = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("pins") / "llama", "llama")


def engine(model_dir: Path, **overrides) -> InprocEngineClient:
    config = build_config(overrides={
        "model": str(model_dir), "dtype": "float32", "device": "cpu", "block_size": BS,
        "num_device_blocks": 24, "max_num_batched_tokens": 256, "max_num_seqs": 4,
        **overrides})
    return InprocEngineClient(config, InprocExecutor(config))


def tokens(seed: int, n: int) -> list[int]:
    """``n`` random token ids (distinct prompts differ from their first token on)."""
    rng = random.Random(seed)
    return [rng.randrange(3, 300) for _ in range(n)]


async def generate(client: InprocEngineClient, rid: str, prompt: list[int],
                   **fields) -> tuple[list[int], int]:
    """Greedy tokens and the reported cached tokens; ``fields`` are EngineRequest fields."""
    req = EngineRequest(request_id=rid, prompt_token_ids=prompt, arrival_time=time.time(),
                        sampling=SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0))
    return await run_request(client, msgspec.structs.replace(req, **fields))


async def flood(client: InprocEngineClient) -> None:
    """Distinct prompts that cycle every unpinned block of the pool."""
    for i in range(4):
        await generate(client, f"flood{i}", tokens(100 + i, 72))


async def shutdown_and_check(client: InprocEngineClient) -> None:
    """Stop the loop, check every invariant, and that nothing but pins held blocks."""
    await client.shutdown()
    sched = client.core.scheduler
    sched.check_integrity()
    assert not sched.has_unfinished()
    if sched.kv.pins is not None:
        sched.kv.pins.clear()
    sched.check_integrity()
    assert sched.kv.num_free_blocks == sched.kv.num_usable_blocks


def two_turns(model_dir: Path, **overrides) -> tuple[int, int]:
    """Turn 1, the flood, turn 2: (turn 2's cached tokens, pin hits)."""
    prompt = tokens(1, PROMPT_BLOCKS * BS)

    async def main() -> tuple[int, int]:
        client = engine(model_dir, **overrides)
        await client.start()
        out, cached = await generate(client, "t1", prompt, prompt_cache_key="job",
                                     is_last_step=False, pin_ttl_s=300.0)
        assert cached == 0 and len(out) == 8
        await flood(client)
        _, cached = await generate(client, "t2", prompt + out + tokens(2, 8),
                                   prompt_cache_key="job", is_last_step=False)
        hits = client.stats()["pin_hits"]
        await shutdown_and_check(client)
        return cached, hits

    return asyncio.run(main())


def test_pinned_turn_survives_a_flood(model_dir: Path) -> None:
    cached, hits = two_turns(model_dir)
    assert cached >= PROMPT_BLOCKS * BS, "turn 2 found turn 1's prompt blocks on the device"
    assert hits == 1


def test_without_pins_the_flood_evicts_the_turn(model_dir: Path) -> None:
    cached, hits = two_turns(model_dir, enable_ttl_pins=False)
    assert cached < 2 * BS and hits == 0


def test_breakpoint_pin_keeps_a_prefix_after_the_last_step(model_dir: Path) -> None:
    shared = tokens(3, 3 * BS)  # e.g. a system prompt and tool definitions

    async def main() -> int:
        client = engine(model_dir)
        await client.start()
        await generate(client, "a", shared + tokens(4, 16), prompt_cache_key="job-a",
                       is_last_step=True, pin_breakpoints=[(len(shared), 300.0)])
        await flood(client)
        _, cached = await generate(client, "b", shared + tokens(5, 16),
                                   prompt_cache_key="job-b", is_last_step=True)
        await shutdown_and_check(client)
        return cached

    assert asyncio.run(main()) == len(shared)

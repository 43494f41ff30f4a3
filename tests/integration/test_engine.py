"""The engine end to end on CPU with SmolLM2 (fp32): batching, prefix reuse, worker death.

The engine runs in-process (scheduler on a thread, model runner in-process) except for the
worker-death test, which runs the worker as a real child process and kills it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from encore.configs.loading import build_config
from encore.protocol.client import EngineError
from encore.protocol.executor import MPExecutor
from encore.protocol.messages import EngineRequest, SamplingParams
from encore.scheduler.inproc_client import InprocEngineClient
from encore.server.tokenizer import load_tokenizer
from encore.worker.executor import InprocExecutor
from encore.worker.loader import default_gguf_path
from tests.helpers.engine_requests import run_request

pytestmark = pytest.mark.slow

TEXTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three prime numbers:",
    "Once upon a time, in a small village near the mountains, there lived an old clockmaker "
    "who had never once been late for anything in his entire life, until one winter morning",
    "Translate to German: good morning, how are you today?",
    "1, 2, 3, 4, 5,",
    "Photosynthesis is the process by which",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(default_gguf_path()))


def prompts(tokenizer, count: int) -> list[list[int]]:
    """``count`` prompts of mixed lengths (8 to ~150 tokens)."""
    out = []
    for i in range(count):
        text = " ".join(TEXTS[(i + j) % len(TEXTS)] for j in range(1 + i % 4))
        out.append(tokenizer.encode(text))
    return out


async def generate(client, prompt: list[int], rid: str, max_tokens: int = 24,
                   **sampling) -> tuple[list[int], int]:
    """Tokens (greedy unless ``sampling`` says otherwise) and the reported cached tokens."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                            **{"temperature": 0.0, **sampling})
    req = EngineRequest(request_id=rid, prompt_token_ids=prompt, sampling=params,
                        arrival_time=time.time())
    return await run_request(client, req)


def engine(**overrides) -> InprocEngineClient:
    config = build_config(overrides={"dtype": "float32", **overrides})
    return InprocEngineClient(config, InprocExecutor(config))


def test_batch_invariance_with_chunked_prefill_and_preemption(tokenizer):
    """One greedy request gives the same tokens alone and inside a pressured batch of 16."""

    async def main():
        client = engine(enable_prefix_caching=False, num_device_blocks=48,
                        max_num_batched_tokens=64, max_num_seqs=16)
        await client.start()
        batch = prompts(tokenizer, 16)
        target = batch[4]
        alone, _ = await generate(client, target, "alone")
        results = await asyncio.gather(
            *(generate(client, p, f"b{i}") for i, p in enumerate(batch)))
        stats = client.stats()
        client.core.scheduler.check_integrity()
        await client.shutdown()
        return alone, results, stats

    alone, results, stats = asyncio.run(main())
    assert stats["preemptions"] > 0, "the pool was meant to force a preemption"
    assert [len(tokens) for tokens, _ in results] == [24] * 16
    assert results[4][0] == alone


def test_prefix_reuse_reports_cached_tokens_and_same_tokens(tokenizer):
    """A second request sharing a 256-token prefix hits it and answers as a cold run does."""
    text = " ".join(TEXTS * 4)
    prefix = tokenizer.encode(text)[:256]
    first = prefix + tokenizer.encode(" Summarize the story above.")
    second = prefix + tokenizer.encode(" What did the clockmaker do?")

    async def main():
        cold = engine(enable_prefix_caching=False, num_device_blocks=128)
        await cold.start()
        expected, cold_cached = await generate(cold, second, "cold")
        await cold.shutdown()
        warm = engine(num_device_blocks=128)
        await warm.start()
        await generate(warm, first, "first")
        got, cached = await generate(warm, second, "second")
        warm.core.scheduler.check_integrity()
        stats = warm.stats()
        await warm.shutdown()
        return expected, cold_cached, got, cached, stats

    expected, cold_cached, got, cached, stats = asyncio.run(main())
    assert cold_cached == 0
    assert cached >= 256
    assert stats["prefix_hits"] >= 256
    assert got == expected


def test_killed_worker_fails_requests_quickly_and_restarts(tokenizer):
    """SIGKILL the worker mid-generation: the caller gets a clear error within 2 s."""
    config = build_config(overrides={"dtype": "float32", "num_device_blocks": 64})

    async def main():
        executor = MPExecutor(config)
        client = InprocEngineClient(config, executor)
        await client.start()
        prompt = tokenizer.encode("Tell me a long story about a dragon.")
        params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
        req = EngineRequest(request_id="victim", prompt_token_ids=prompt, sampling=params,
                            arrival_time=time.time())
        seen, error, killed_at = 0, None, None
        try:
            async for out in client.generate(req):
                seen += len(out.new_token_ids)
                if seen >= 3 and killed_at is None:
                    os.kill(executor.pid, signal.SIGKILL)
                    killed_at = time.monotonic()
        except EngineError as e:
            error = e
        delay = time.monotonic() - killed_at
        # The engine restarts the worker; a new request waits for it, then succeeds.
        again, _ = await generate(client, prompt, "after", max_tokens=4)
        client.core.scheduler.check_integrity()
        await client.shutdown()
        return error, delay, again

    error, delay, again = asyncio.run(main())
    assert error is not None and "worker" in str(error)
    assert delay < 2.0
    assert len(again) == 4


def test_prompt_logprobs_survive_chunked_prefill(tokenizer):
    """Prompt logprobs (completions echo) are the same whether the prompt is chunked or not."""
    prompt = tokenizer.encode(" ".join(TEXTS[:5]))

    async def collect(client, rid):
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        req = EngineRequest(request_id=rid, prompt_token_ids=prompt, sampling=params,
                            arrival_time=time.time())
        return [out.prompt_logprobs async for out in client.generate(req)
                if out.prompt_logprobs is not None]

    async def main():
        results = []
        for budget in (2048, 16):  # whole prompt in one step, then 16-token chunks
            client = engine(max_num_batched_tokens=budget, num_device_blocks=64)
            await client.start()
            results.append(await collect(client, f"plp-{budget}"))
            await client.shutdown()
        return results

    (whole,), (chunked,) = asyncio.run(main())
    assert len(whole) == len(chunked) == len(prompt)
    assert whole[0] is None and chunked[0] is None
    assert [e.token_id for e in whole[1:]] == prompt[1:]
    for a, b in zip(whole[1:], chunked[1:], strict=True):
        assert a.top[0].token_id == b.top[0].token_id
        assert abs(a.logprob - b.logprob) < 1e-3


def test_seeded_sampling_ignores_batch_neighbours_and_n_is_reproducible(tokenizer):
    """Same seed, same tokens, alone or among unseeded neighbours; n=3 children differ."""
    batch = prompts(tokenizer, 6)
    target = batch[2]
    seeded = {"temperature": 0.9, "top_p": 0.95, "seed": 1234}

    async def n_children(client, rid: str) -> list[list[int]]:
        params = SamplingParams(n=3, max_tokens=12, ignore_eos=True, **seeded)
        req = EngineRequest(request_id=rid, prompt_token_ids=target, sampling=params,
                            arrival_time=time.time())
        outs: list[list[int]] = [[], [], []]
        async for out in client.generate(req):
            outs[out.index].extend(out.new_token_ids)
        return outs

    async def main():
        client = engine(num_device_blocks=96, max_num_batched_tokens=64)
        await client.start()
        alone, _ = await generate(client, target, "alone", **seeded)
        mixed = await asyncio.gather(*(
            generate(client, p, f"m{i}", **(seeded if i == 2 else {"temperature": 1.0}))
            for i, p in enumerate(batch)))
        first = await n_children(client, "n-a")
        second = await n_children(client, "n-b")
        client.core.scheduler.check_integrity()
        await client.shutdown()
        return alone, mixed, first, second

    alone, mixed, first, second = asyncio.run(main())
    assert mixed[2][0] == alone
    assert first == second and len({tuple(c) for c in first}) > 1


def test_prompt_ids_past_the_vocabulary_are_refused_and_others_still_run(tokenizer):
    """The engine knows the model's vocabulary: an id past it is the request's error, not a
    failed worker step that would take every request in flight with it."""

    async def main():
        client = engine()
        await client.start()
        vocab = client.core.worker.vocab_size
        good = asyncio.create_task(generate(client, prompts(tokenizer, 1)[0], "good",
                                            max_tokens=8))
        bad = EngineRequest(request_id="bad", prompt_token_ids=[1, vocab, 2],
                            sampling=SamplingParams(max_tokens=4), arrival_time=time.time())
        with pytest.raises(EngineError, match=rf"prompt token ids must be in \[0, {vocab}\)"):
            await run_request(client, bad)
        tokens, _ = await good
        await client.shutdown()
        return tokens

    assert len(asyncio.run(main())) == 8

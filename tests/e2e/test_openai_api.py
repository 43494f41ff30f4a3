"""The official ``openai`` client against a real Encore server (SmolLM2 on the CPU)."""

from __future__ import annotations

import asyncio

import openai
import pytest

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Name three colors."}]
PROMPT = "The capital of France is"


def test_models_lists_the_served_model(client, model) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [model]


def test_chat_streaming_equals_non_streaming_greedy(client, model) -> None:
    full = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16,
                                          temperature=0)
    text = full.choices[0].message.content
    assert text and full.usage.completion_tokens <= 16
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16,
                                            temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == text


def test_completions_streaming_equals_non_streaming_greedy(client, model) -> None:
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=12,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == full.choices[0].text
    assert full.choices[0].finish_reason in ("stop", "length")


def test_n_with_seed_is_reproducible(client, model) -> None:
    def run():
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10,
                                           temperature=1.0, n=2, seed=1234)
        return [c.message.content for c in sorted(r.choices, key=lambda c: c.index)], r

    (a, r), (b, _) = run(), run()
    assert a == b and [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1]
    assert r.usage.completion_tokens > 0


def test_stop_string_is_not_emitted(client, model) -> None:
    base = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) > 8
    stop = base[4:7]
    expected = base[:base.find(stop)]
    for stream in (False, True):
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                      stop=[stop], stream=stream,
                                      extra_body={"ignore_eos": True})
        if stream:
            chunks = [c for c in r if c.choices]
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert (text, reason) == (expected, "stop")


def test_chat_logprobs_shape(client, model) -> None:
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)


def test_completions_echo_logprobs(client, model) -> None:
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0,
                                  logprobs=2, echo=True, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(PROMPT)
    assert len(lp.tokens) == r.usage.prompt_tokens + 3
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])


def test_include_usage_in_stream(client, model) -> None:
    chunks = list(client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=4, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


def test_cached_tokens_on_repeated_long_prompt(client, model) -> None:
    long = "Here is a long shared system prompt about caching. " * 20
    msgs = [{"role": "system", "content": long}, {"role": "user", "content": "Hi"}]
    first = client.chat.completions.create(model=model, messages=msgs, max_tokens=2)
    second = client.chat.completions.create(model=model, messages=msgs, max_tokens=2)
    assert first.usage.prompt_tokens > 100
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_32_concurrent_streams(server, model) -> None:
    from tests.e2e.e2e_server import API_KEY

    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[int, str]:
        stream = await c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Count to {i}."}],
            max_tokens=6, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        usage, reason = None, None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].finish_reason:
                reason = chunk.choices[0].finish_reason
        return usage.completion_tokens, reason

    async def run():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0,
                                      timeout=180) as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    results = asyncio.run(run())
    assert results == [(6, "length")] * 32


def test_extensions_and_unknown_model(client, model) -> None:
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=4, temperature=0.7, seed=3,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2,
                    "priority": 0, "prompt_cache_key": "e2e-program"})
    assert r.usage.completion_tokens >= 2
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=MESSAGES, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=MESSAGES,
                                       extra_body={"cache_salt": "t"})


def test_tool_conversation_renders_through_the_fallback(client, model) -> None:
    """SmolLM2's template has no tool support: the Hermes fallback must render a whole tool
    turn. What the model answers is not asserted, only that the response is well formed."""
    tools = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object",
                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    r = client.chat.completions.create(model=model, messages=messages, tools=tools,
                                       max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    assert r.usage.prompt_tokens > 60  # the tool section was rendered

"""``POST /v1/completions``: text or token-id prompts (one or many), echo, legacy logprobs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from encore.protocol.client import EngineError
from encore.server.errors import APIError, error_body, invalid
from encore.server.generation import SeqDelta, SequenceTracker, merge_streams, stream_request
from encore.server.logprobs import CompletionLogprobs
from encore.server.schemas import CompletionRequest, parse_body
from encore.server.serving import (
    ServingContext,
    UsageTracker,
    admit,
    cache_block_size,
    check_common,
    check_model,
    check_num_seqs,
    check_prompt_size,
    engine_request,
    new_id,
    resolve_max_tokens,
    sampling_params,
    take_session_header,
    until_disconnect,
)
from encore.server.sse import DONE, SSEResponse, sse_event

MAX_PROMPTS = 64


@dataclass
class Prompt:
    token_ids: list[int]
    text: str  # for echo


async def create_completion(ctx: ServingContext, request: Request, body: Any,
                            arrival: float) -> Response:
    req = parse_body(CompletionRequest, body)
    take_session_header(req, request)
    check_model(ctx, req.model)
    check_common(ctx, req)
    _check_unsupported(req)
    prompts = await _tokenize_prompts(ctx, _prompt_list(req.prompt), req.n)
    rid = new_id("cmpl")
    usage = UsageTracker(cache_block_size(ctx))
    prompt_lps = req.logprobs if req.echo else None
    streams = []
    for p, prompt in enumerate(prompts):
        max_tokens = resolve_max_tokens(ctx, len(prompt.token_ids), req.requested_max_tokens(),
                                        "max_tokens", "prompt")
        sampling = sampling_params(req, max_tokens, req.num_logprobs(), prompt_lps)
        ereq = engine_request(ctx, req, f"{rid}-{p}", prompt.token_ids, sampling, time.time(),
                              tenant=getattr(request.state, "tenant", None))
        trackers = [SequenceTracker(p * req.n + i, ctx.tokenizer, prompt.token_ids,
                                    req.stop_strings()) for i in range(req.n)]
        streams.append(stream_request(ctx, ereq, trackers, arrival))
        usage.add_prompt(len(prompt.token_ids))
    admit(ctx, len(prompts) * req.n)
    state = _Choices(ctx, req, prompts)
    deltas = merge_streams(streams)
    if req.stream:
        return SSEResponse(_stream(ctx, req, rid, deltas, usage, state))
    return JSONResponse(await until_disconnect(request, _collect(ctx, req, rid, deltas, usage,
                                                                 state)))


def _check_unsupported(req: CompletionRequest) -> None:
    if req.suffix:
        raise invalid("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise invalid("best_of other than n is not supported", "best_of")


def _prompt_list(prompt: Any) -> list[str] | list[list[int]]:
    """The prompts of a request, whichever of the four forms it used (400 when empty)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise invalid("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise invalid(f"at most {MAX_PROMPTS} prompts per request", "prompt")
    return prompt


async def _tokenize_prompts(ctx: ServingContext, prompts: list[str] | list[list[int]],
                            n: int) -> list[Prompt]:
    """Check every prompt's size first (cheap 400s before any tokenization), then tokenize
    the text ones off the event loop."""
    check_num_seqs(ctx, len(prompts), n)
    for item in prompts:
        if isinstance(item, str):
            check_prompt_size(ctx, len(item), "prompt")
        elif any(t < 0 or t >= ctx.vocab_size for t in item):
            raise invalid(f"prompt token ids must be in [0, {ctx.vocab_size})", "prompt")
    tok = ctx.tokenizer
    out: list[Prompt] = []
    for item in prompts:
        if isinstance(item, str):
            ids = await anyio.to_thread.run_sync(lambda s=item: tok.encode(
                s, add_special_tokens=True))
            out.append(Prompt(ids, item))
        else:
            out.append(Prompt(list(item), ""))
    return out


class _Choices:
    """Per-choice echo and logprob state shared by the JSON and SSE paths."""

    def __init__(self, ctx: ServingContext, req: CompletionRequest,
                 prompts: list[Prompt]) -> None:
        self.ctx, self.req, self.prompts = ctx, req, prompts
        self.count = len(prompts) * req.n
        self.started = [False] * self.count
        self.lps = [CompletionLogprobs(ctx.token_text, req.logprobs or 0)
                    for _ in range(self.count)]

    def text_of(self, d: SeqDelta) -> str:
        """Delta text, with the echoed prompt in front of a choice's first delta."""
        if self.started[d.index]:
            return d.text
        self.started[d.index] = True
        if not self.req.echo:
            return d.text
        prompt = self.prompts[d.index // self.req.n]
        text = prompt.text or self.ctx.tokenizer.decode(prompt.token_ids)
        if self.req.logprobs is not None:
            plps = d.output.prompt_logprobs if d.output is not None else None
            self.lps[d.index].add_prompt(prompt.token_ids, plps)
        return text + d.text

    def add_logprobs(self, d: SeqDelta) -> None:
        if self.req.logprobs is not None:
            self.lps[d.index].add(d.logprobs)


async def _collect(ctx: ServingContext, req: CompletionRequest, rid: str,
                   deltas: AsyncIterator[SeqDelta], usage: UsageTracker,
                   state: _Choices) -> dict[str, Any]:
    texts = [""] * state.count
    reasons: list[str | None] = [None] * state.count
    try:
        async with aclosing(deltas):
            async for d in deltas:
                usage.observe(d)
                texts[d.index] += state.text_of(d)
                state.add_logprobs(d)
                reasons[d.index] = d.finish_reason or reasons[d.index]
    except EngineError as e:
        raise APIError(500, str(e), code="engine_error") from None
    choices = [{"index": i, "text": texts[i],
                "logprobs": state.lps[i].body() if req.logprobs is not None else None,
                "finish_reason": reasons[i] or "abort"} for i in range(state.count)]
    return {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": ctx.model_name, "choices": choices, "usage": usage.body()}


async def _stream(ctx: ServingContext, req: CompletionRequest, rid: str,
                  deltas: AsyncIterator[SeqDelta], usage: UsageTracker,
                  state: _Choices) -> AsyncIterator[bytes]:
    base: dict[str, Any] = {"id": rid, "object": "text_completion",
                            "created": int(time.time()), "model": ctx.model_name}
    if req.include_usage():
        base["usage"] = None
    try:
        async with aclosing(deltas):
            async for d in deltas:
                usage.observe(d)
                text = state.text_of(d)
                state.add_logprobs(d)
                if not (text or d.finish_reason or d.logprobs):
                    continue
                lps = state.lps[d.index].take() if req.logprobs is not None else None
                yield sse_event({**base, "choices": [{"index": d.index, "text": text,
                                                      "logprobs": lps,
                                                      "finish_reason": d.finish_reason}]})
        if req.include_usage():
            yield sse_event({**base, "choices": [], "usage": usage.body()})
    except EngineError as e:
        yield sse_event(error_body(str(e), "internal_error", code="engine_error"))
    yield DONE

"""``POST /v1/chat/completions``: chat template, generation, JSON or SSE response."""

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
from encore.protocol.messages import GrammarSpec
from encore.server.chat_parts import ChatPrompt, TextEscapes, part_marks, render_marked
from encore.server.chat_tools import (
    check_tools,
    render_messages,
    template_supports_tools,
    tool_names,
    tools_enabled,
)
from encore.server.errors import APIError, error_body, invalid
from encore.server.generation import SeqDelta, SequenceTracker, stream_request
from encore.server.logprobs import chat_logprobs
from encore.server.schemas import ChatCompletionRequest, parse_body
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
from encore.server.structured import chat_grammar
from encore.server.tool_parsers import StreamingToolParser, parse_tool_calls


@dataclass
class ChatRun:
    """A chat request on its way through the engine: its prompt, its deltas (one stream for
    all ``n`` choices), and its usage as the deltas arrive."""

    req: ChatCompletionRequest
    rid: str
    prompt_ids: list[int]
    deltas: AsyncIterator[SeqDelta]
    usage: UsageTracker


async def create_chat_completion(ctx: ServingContext, request: Request, body: Any,
                                 arrival: float) -> Response:
    req = parse_body(ChatCompletionRequest, body)
    take_session_header(req, request)
    run = await start_chat(ctx, request, req, new_id("chatcmpl"), arrival)
    if req.stream:
        return SSEResponse(_stream(ctx, req, run.rid, run.deltas, run.usage))
    return JSONResponse(await until_disconnect(
        request, _collect(ctx, req, run.rid, run.deltas, run.usage)))


async def start_chat(ctx: ServingContext, request: Request, req: ChatCompletionRequest,
                     rid: str, arrival: float) -> ChatRun:
    """Check ``req`` (400s), render and tokenize it, and submit it to the engine."""
    check_model(ctx, req.model)
    check_common(ctx, req)
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs requires logprobs: true", "top_logprobs")
    check_tools(req)
    grammar = await structured_grammar(ctx, req)
    check_num_seqs(ctx, 1, req.n)
    # every message's text is in the prompt: a lower bound on its size, known before rendering
    check_prompt_size(ctx, sum(len(m.text()) for m in req.messages), "messages")
    prompt = await render_chat(ctx, req)
    prompt_ids = prompt.token_ids
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    max_tokens = resolve_max_tokens(ctx, len(prompt_ids), req.requested_max_tokens(), param,
                                    "messages")
    sampling = sampling_params(req, max_tokens, req.num_logprobs())
    admit(ctx, req.n)
    ereq = engine_request(ctx, req, rid, prompt_ids, sampling, time.time(),
                          tenant=getattr(request.state, "tenant", None), chunks=prompt.chunks,
                          pin_breakpoints=prompt.pin_breakpoints,
                          soft_pin_breakpoints=prompt.soft_pin_breakpoints, grammar=grammar)
    trackers = [SequenceTracker(i, ctx.tokenizer, prompt_ids, req.stop_strings())
                for i in range(req.n)]
    usage = UsageTracker(cache_block_size(ctx))
    usage.add_prompt(len(prompt_ids))
    return ChatRun(req, rid, prompt_ids, stream_request(ctx, ereq, trackers, arrival), usage)


async def structured_grammar(ctx: ServingContext,
                             req: ChatCompletionRequest) -> GrammarSpec | None:
    """The grammar the output must match (server.structured), checked off the event loop;
    400 when it cannot be enforced here."""
    if req.response_format is None and not req.tools:
        return None
    grammar = await anyio.to_thread.run_sync(chat_grammar, req,
                                             ctx.config.server.tool_call_parser)
    if grammar is not None and not ctx.grammar_ready:
        raise invalid("structured outputs are not supported by this server: its tokenizer "
                      "cannot be handed to the grammar engine", "response_format")
    return grammar


async def render_chat(ctx: ServingContext, req: ChatCompletionRequest) -> ChatPrompt:
    """Apply the model's chat template and tokenize (off the event loop). Chunk parts and
    explicit breakpoints are tokenized part by part, and special-token strings in client text
    are text, not control tokens (server.chat_parts)."""
    tok = ctx.tokenizer
    cache = ctx.config.cache
    marks = part_marks(ctx, req)
    native = template_supports_tools(tok)
    escapes = TextEscapes(tok)

    def render(r: ChatCompletionRequest) -> str:
        messages, tools = render_messages(r, native=native)
        return tok.apply_chat_template(escapes.escape(messages), add_generation_prompt=True,
                                       tools=escapes.escape(tools))

    def run() -> ChatPrompt:
        return render_marked(escapes, render, req, marks, cache.chunk_reuse,
                             cache.chunk_min_tokens)

    try:
        return await anyio.to_thread.run_sync(run)
    except APIError:
        raise
    except Exception as e:  # a template may reject a conversation (e.g. role order)
        raise invalid(f"could not apply the chat template: {str(e)[:200]}", "messages") from None


def _choice_logprobs(ctx: ServingContext, req: ChatCompletionRequest,
                     d: SeqDelta) -> dict[str, Any] | None:
    if not req.logprobs:
        return None
    return {"content": chat_logprobs(ctx.token_text, d.logprobs, req.top_logprobs or 0)}


async def _collect(ctx: ServingContext, req: ChatCompletionRequest, rid: str,
                   deltas: AsyncIterator[SeqDelta], usage: UsageTracker) -> dict[str, Any]:
    texts = [""] * req.n
    lps: list[list[Any]] = [[] for _ in range(req.n)]
    reasons: list[str | None] = [None] * req.n
    try:
        async with aclosing(deltas):
            async for d in deltas:
                usage.observe(d)
                texts[d.index] += d.text
                lps[d.index].extend(d.logprobs)
                reasons[d.index] = d.finish_reason or reasons[d.index]
    except EngineError as e:
        raise APIError(500, str(e), code="engine_error") from None
    choices = []
    for i in range(req.n):
        logprobs = None
        if req.logprobs:
            logprobs = {"content": chat_logprobs(ctx.token_text, lps[i], req.top_logprobs or 0)}
        message, reason = assistant_message(ctx, req, texts[i], reasons[i] or "abort")
        if i == 0 and reason == "tool_calls":
            tools_called(ctx, req, [c["function"]["name"] for c in message["tool_calls"]])
        choices.append({"index": i, "message": message, "logprobs": logprobs,
                        "finish_reason": reason})
    return {"id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": ctx.model_name, "choices": choices, "usage": usage.body()}


def assistant_message(ctx: ServingContext, req: ChatCompletionRequest, text: str,
             reason: str) -> tuple[dict[str, Any], str]:
    """The assistant message of one choice and its finish reason (tool calls parsed out)."""
    if not tools_enabled(req):
        return {"role": "assistant", "content": text}, reason
    parsed = parse_tool_calls(ctx.config.server.tool_call_parser, text, tool_names(req))
    if not parsed.tool_calls:
        return {"role": "assistant", "content": text}, reason
    return {"role": "assistant", "content": parsed.content,
            "tool_calls": [c.to_api() for c in parsed.tool_calls]}, "tool_calls"


async def _stream(ctx: ServingContext, req: ChatCompletionRequest, rid: str,
                  deltas: AsyncIterator[SeqDelta], usage: UsageTracker) -> AsyncIterator[bytes]:
    base: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk",
                            "created": int(time.time()), "model": ctx.model_name}
    if req.include_usage():
        base["usage"] = None
    try:
        async with aclosing(deltas):
            async for event in _stream_events(ctx, req, base, deltas, usage):
                yield event
    except EngineError as e:
        yield sse_event(error_body(str(e), "internal_error", code="engine_error"))
    yield DONE


async def _stream_events(ctx: ServingContext, req: ChatCompletionRequest, base: dict[str, Any],
                         deltas: AsyncIterator[SeqDelta],
                         usage: UsageTracker) -> AsyncIterator[bytes]:
    def chunk(choice: dict[str, Any]) -> bytes:
        return sse_event({**base, "choices": [choice]})

    for i in range(req.n):
        yield chunk({"index": i, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None})
    parsers = _stream_parsers(ctx, req)
    async for d in deltas:
        usage.observe(d)
        delta = _delta(parsers, d)
        if not (delta or d.finish_reason or (req.logprobs and d.logprobs)):
            continue
        reason = d.finish_reason
        if reason and parsers and parsers[d.index].num_calls:
            reason = "tool_calls"
            if d.index == 0:
                tools_called(ctx, req, parsers[0].called)
        yield chunk({"index": d.index, "delta": delta,
                     "logprobs": _choice_logprobs(ctx, req, d), "finish_reason": reason})
    if req.include_usage():
        yield sse_event({**base, "choices": [], "usage": usage.body()})


def tools_called(ctx: ServingContext, req: ChatCompletionRequest, names: list[str]) -> None:
    """An agent program's turn (choice 0) ended in tool calls: the engine's TTL pins learn
    per tool how long the program pauses (nothing to learn after its last step)."""
    program = req.program_key()
    if program is not None and not req.is_last_step:
        ctx.engine.tool_called(program, list(names), req._engine_salt)


def _stream_parsers(ctx: ServingContext,
                    req: ChatCompletionRequest) -> list[StreamingToolParser] | None:
    if not tools_enabled(req):
        return None
    names = tool_names(req)
    return [StreamingToolParser(ctx.config.server.tool_call_parser, names)
            for _ in range(req.n)]


def _delta(parsers: list[StreamingToolParser] | None, d: SeqDelta) -> dict[str, Any]:
    """The ``delta`` of one chunk: content, and completed tool calls (held text released at
    the end of the choice)."""
    if parsers is None:
        return {"content": d.text} if d.text else {}
    parser = parsers[d.index]
    first = parser.num_calls
    text, calls = parser.feed(d.text)
    if d.finish_reason:
        more_text, more_calls = parser.finish()
        text, calls = text + more_text, calls + more_calls
    delta: dict[str, Any] = {"content": text} if text else {}
    if calls:
        delta["tool_calls"] = [{"index": first + k, **c.to_api()} for k, c in enumerate(calls)]
    return delta

"""``/v1/responses``: create (JSON or a stream of typed events), read back, delete.

A create is a chat completion underneath: the input items (after the stored conversation of
``previous_response_id``, and ``instructions`` first) become chat messages, ``text.format``
becomes ``response_format``, flat function tools become chat tools (``strict`` defaults to
true, as in OpenAI's Responses API), and the chat pipeline renders, constrains and generates.

A stored chain is an agent program: its key is ``response:<first response id>`` within the
tenant (unless the request names its own ``prompt_cache_key`` / session), so each turn's KV is
pinned until the next turn arrives and the follow-up reuses it (``cached_tokens``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from encore.protocol.client import EngineError
from encore.server.chat import ChatRun, assistant_message, start_chat, tools_called
from encore.server.chat_tools import tool_names, tools_enabled
from encore.server.errors import APIError, invalid
from encore.server.response_store import ResponseStore, StoredResponse, default_db_path
from encore.server.responses_schemas import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoice,
    ResponsesRequest,
)
from encore.server.schemas import ChatCompletionRequest, parse_body
from encore.server.serving import ServingContext, take_session_header, until_disconnect
from encore.server.sse import SSEResponse, sse_event
from encore.server.tool_parsers import StreamingToolParser, ToolCall


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_store(ctx: ServingContext) -> ResponseStore:
    """The server's store, opened on first use (docs/api.md says where it lives)."""
    if ctx.responses is None:
        server = ctx.config.server
        ctx.responses = ResponseStore(default_db_path(ctx.config), server.responses_retention_s,
                                      server.responses_max_stored)
    return ctx.responses


def _not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"no response with id {response_id[:64]!r} (unknown, deleted, expired "
                         "or another API key's)", param=param, code="response_not_found")


async def create_response(ctx: ServingContext, request: Request, body: Any,
                          arrival: float) -> Response:
    req = parse_body(ResponsesRequest, body)
    tenant = getattr(request.state, "tenant", None)
    prev = None
    if req.previous_response_id is not None:
        prev = await anyio.to_thread.run_sync(response_store(ctx).get, tenant,
                                              req.previous_response_id)
        if prev is None:
            raise _not_found(req.previous_response_id, "previous_response_id")
    rid = _id("resp")
    new = input_messages(req)
    chat = parse_body(ChatCompletionRequest, chat_body(req, prev, new, rid))
    take_session_header(chat, request)
    run = await start_chat(ctx, request, chat, rid, arrival)
    turn = _Turn(ctx, req, run, tenant, prev, new)
    if req.stream:
        return SSEResponse(_stream(turn))
    return JSONResponse(await until_disconnect(request, turn.collect()))


def input_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """This turn's input items as chat messages (function calls join the assistant message
    before them; their outputs become ``tool`` messages)."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    out: list[dict[str, Any]] = []
    for item in req.input:
        if isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if not out or out[-1]["role"] != "assistant":
                out.append({"role": "assistant", "content": None})
            out[-1].setdefault("tool_calls", []).append(call)
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        else:
            out.append({"role": item.role, "content": item.text()})
    return out


def chat_body(req: ResponsesRequest, prev: StoredResponse | None, new: list[dict[str, Any]],
              rid: str) -> dict[str, Any]:
    """The chat completion request a create runs as."""
    if req.truncation is not None and req.truncation != "disabled":
        raise invalid("truncation 'auto' is not supported", "truncation")
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else [])
    messages += (prev.conversation if prev else []) + new
    key = req.prompt_cache_key
    if key is None and req.session_id is None and (req.store or prev is not None):
        key = f"response:{prev.root if prev else rid}"
    body: dict[str, Any] = {
        "model": req.model, "messages": messages, "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "tools": _chat_tools(req),
        "tool_choice": _chat_tool_choice(req.tool_choice),
        "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": _chat_format(req), "prompt_cache_key": key,
        "prompt_cache_retention": req.prompt_cache_retention,
        "prompt_cache_options": req.prompt_cache_options, "session_id": req.session_id,
        "cache_control": req.cache_control, "user": req.user}
    return {k: v for k, v in body.items() if v is not None}


def _chat_tools(req: ResponsesRequest) -> list[dict[str, Any]] | None:
    if not req.tools:
        return None
    return [{"type": "function", "function": {
        "name": t.name, "description": t.description, "parameters": t.parameters,
        "strict": True if t.strict is None else t.strict}} for t in req.tools]


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, FunctionChoice):
        return {"type": "function", "function": {"name": choice.name}}
    return choice


def _chat_format(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type != "json_schema":
        return None if fmt is None else {"type": fmt.type}
    return {"type": "json_schema", "json_schema": {
        "name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict,
        "description": fmt.description}}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(item_id: str, call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": status}


class _Turn:
    """One create: builds the response object, stores it, and (streaming) its events."""

    def __init__(self, ctx: ServingContext, req: ResponsesRequest, run: ChatRun,
                 tenant: str | None, prev: StoredResponse | None,
                 new: list[dict[str, Any]]) -> None:
        self.ctx, self.req, self.run, self.tenant, self.prev, self.new = (
            ctx, req, run, tenant, prev, new)
        self.created = int(time.time())
        self.output: list[dict[str, Any]] = []
        self.reason: str | None = None

    def body(self, status: str, usage: dict[str, Any] | None) -> dict[str, Any]:
        req = self.req
        incomplete = {"reason": "max_output_tokens"} if self.reason == "length" else None
        fmt = req.text.format if req.text is not None and req.text.format else None
        return {
            "id": self.run.rid, "object": "response", "created_at": self.created,
            "status": status, "error": None, "incomplete_details": incomplete,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": self.ctx.model_name, "output": self.output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "store": req.store,
            "temperature": req.temperature, "top_p": req.top_p,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt
                     else {"type": "text"}},
            "tool_choice": (req.tool_choice.model_dump() if isinstance(
                req.tool_choice, FunctionChoice) else req.tool_choice or "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "truncation": "disabled", "metadata": req.metadata or {}, "user": req.user,
            "prompt_cache_key": self.run.req.prompt_cache_key, "usage": usage}

    def usage(self) -> dict[str, Any]:
        u = self.run.usage.body()
        details = u["prompt_tokens_details"]
        return {"input_tokens": u["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": details["cached_tokens"],
                                         "cache_write_tokens": details["cache_write_tokens"]},
                "output_tokens": u["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u["total_tokens"]}

    def status(self) -> str:
        return "completed" if self.reason in ("stop", "tool_calls") else "incomplete"

    async def collect(self) -> dict[str, Any]:
        text, reason = "", None
        try:
            async with aclosing(self.run.deltas) as deltas:
                async for d in deltas:
                    self.run.usage.observe(d)
                    text += d.text
                    reason = d.finish_reason or reason
        except EngineError as e:
            raise APIError(500, str(e), code="engine_error") from None
        message, self.reason = assistant_message(self.ctx, self.run.req, text, reason or "abort")
        item_status = "completed" if self.status() == "completed" else "incomplete"
        if message.get("content"):
            self.output.append(_message_item(_id("msg"), message["content"], item_status))
        calls = [ToolCall(c["function"]["name"], c["function"]["arguments"], c["id"])
                 for c in message.get("tool_calls") or []]
        self.output += [_call_item(_id("fc"), c) for c in calls]
        return await self.finish(message, [c.name for c in calls])

    async def finish(self, message: dict[str, Any], called: list[str]) -> dict[str, Any]:
        """The final response object; stored when ``store``; pins learn of tool calls."""
        if called:
            tools_called(self.ctx, self.run.req, called)
        result = self.body(self.status(), self.usage())
        if self.req.store:
            history = (self.prev.conversation if self.prev else []) + self.new
            root = self.prev.root if self.prev else self.run.rid
            await anyio.to_thread.run_sync(response_store(self.ctx).put, self.tenant,
                                           self.run.rid, root, result, [*history, message])
        return result


class _Events:
    """Numbered stream events (``sequence_number`` from 0)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, type_: str, **fields: Any) -> bytes:
        event = sse_event({"type": type_, "sequence_number": self.n, **fields})
        self.n += 1
        return event


async def _stream(turn: _Turn) -> AsyncIterator[bytes]:
    ev = _Events()
    yield ev("response.created", response=turn.body("in_progress", None))
    yield ev("response.in_progress", response=turn.body("in_progress", None))
    try:
        async with aclosing(_stream_items(turn, ev)) as events:
            async for event in events:
                yield event
    except EngineError as e:
        yield ev("error", code="engine_error", message=str(e), param=None)


async def _stream_items(turn: _Turn, ev: _Events) -> AsyncIterator[bytes]:
    """Output items as they form: a message item whose text streams as deltas, and each
    completed tool call as a function_call item (text that may start a call is held back
    until decided, as in chat streams)."""
    chat = turn.run.req
    parser = (StreamingToolParser(turn.ctx.config.server.tool_call_parser, tool_names(chat))
              if tools_enabled(chat) else None)
    msg: dict[str, Any] | None = None  # the open message item
    text, calls, reason = "", [], None
    async with aclosing(turn.run.deltas) as deltas:
        async for d in deltas:
            turn.run.usage.observe(d)
            piece, new_calls = (parser.feed(d.text) if parser else (d.text, []))
            if d.finish_reason:
                reason = d.finish_reason
                if parser:
                    more, more_calls = parser.finish()
                    piece, new_calls = piece + more, new_calls + more_calls
            if piece:
                if msg is None:
                    msg = _message_item(_id("msg"), "", "in_progress")
                    for event in _open_message(turn, ev, msg):
                        yield event
                msg["content"][0]["text"] += piece
                text += piece
                yield ev("response.output_text.delta", item_id=msg["id"],
                         output_index=len(turn.output) - 1, content_index=0, delta=piece,
                         logprobs=[])
            for call in new_calls:
                if msg is not None:
                    for event in _close_message(turn, ev, msg, "completed"):
                        yield event
                    msg = None
                for event in _call_events(turn, ev, call):
                    yield event
                calls.append(call)
    turn.reason = "tool_calls" if calls else (reason or "abort")
    if msg is not None:
        status = "completed" if turn.status() == "completed" else "incomplete"
        for event in _close_message(turn, ev, msg, status):
            yield event
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = [c.to_api() for c in calls]
    result = await turn.finish(message, [c.name for c in calls])
    kind = "response.completed" if result["status"] == "completed" else "response.incomplete"
    yield ev(kind, response=result)


def _open_message(turn: _Turn, ev: _Events, msg: dict[str, Any]) -> list[bytes]:
    item = {**msg, "content": []}
    turn.output.append(msg)
    index = len(turn.output) - 1
    return [ev("response.output_item.added", output_index=index, item=item),
            ev("response.content_part.added", item_id=msg["id"], output_index=index,
               content_index=0, part={"type": "output_text", "text": "", "annotations": []})]


def _close_message(turn: _Turn, ev: _Events, msg: dict[str, Any], status: str) -> list[bytes]:
    msg["status"] = status
    index = turn.output.index(msg)
    part = msg["content"][0]
    return [ev("response.output_text.done", item_id=msg["id"], output_index=index,
               content_index=0, text=part["text"], logprobs=[]),
            ev("response.content_part.done", item_id=msg["id"], output_index=index,
               content_index=0, part=part),
            ev("response.output_item.done", output_index=index, item=msg)]


def _call_events(turn: _Turn, ev: _Events, call: ToolCall) -> list[bytes]:
    item = _call_item(_id("fc"), call)
    turn.output.append(item)
    index = len(turn.output) - 1
    return [ev("response.output_item.added", output_index=index,
               item={**item, "arguments": "", "status": "in_progress"}),
            ev("response.function_call_arguments.delta", item_id=item["id"],
               output_index=index, delta=call.arguments),
            ev("response.function_call_arguments.done", item_id=item["id"],
               output_index=index, name=call.name, arguments=call.arguments),
            ev("response.output_item.done", output_index=index, item=item)]


async def get_response(ctx: ServingContext, request: Request, response_id: str) -> Response:
    tenant = getattr(request.state, "tenant", None)
    stored = await anyio.to_thread.run_sync(response_store(ctx).get, tenant, response_id)
    if stored is None:
        raise _not_found(response_id)
    return JSONResponse(stored.body)


async def delete_response(ctx: ServingContext, request: Request, response_id: str) -> Response:
    tenant = getattr(request.state, "tenant", None)
    if not await anyio.to_thread.run_sync(response_store(ctx).delete, tenant, response_id):
        raise _not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

"""Tool calling in chat: request checks and how tools and tool turns reach the prompt.

A chat template that mentions ``tools`` gets them natively (``apply_chat_template(tools=)``),
with assistant ``tool_calls`` and ``tool`` messages passed through. A template without tool
support (SmolLM2's) gets the documented Hermes fallback instead::

    system:    <original system text>\\n\\n# Tools ... <tools>[{...}, ...]</tools> ...
    assistant: <content>\\n<tool_call>{"name": ..., "arguments": {...}}</tool_call>
    user:      <tool_response>\\n<tool result>\\n</tool_response>   (was role "tool")
"""

from __future__ import annotations

import json
from typing import Any

from encore.server.errors import invalid
from encore.server.schemas import ChatCompletionRequest, ChatMessage, ToolCallIn

FALLBACK_INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def check_tools(req: ChatCompletionRequest) -> None:
    """400 (with ``param``) for tool fields that are well-typed but inconsistent."""
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) != len(names):
        raise invalid("tool function names must be unique", "tools")
    choice = req.tool_choice
    if choice is not None and choice != "none" and not names:
        raise invalid("tool_choice needs a non-empty 'tools' list", "tool_choice")
    if not isinstance(choice, str) and choice is not None and choice.function.name not in names:
        raise invalid(f"tool_choice names {choice.function.name[:64]!r}, which is not in "
                      "'tools'", "tool_choice")
    for i, m in enumerate(req.messages):
        if m.tool_calls and m.role != "assistant":
            raise invalid("only assistant messages may have tool_calls",
                          f"messages[{i}].tool_calls")
        if m.role == "tool" and not m.tool_call_id:
            raise invalid("a tool message needs tool_call_id", f"messages[{i}].tool_call_id")


def tools_enabled(req: ChatCompletionRequest) -> bool:
    """Whether tools are rendered and output is parsed for calls (not with ``"none"``)."""
    return bool(req.tools) and req.tool_choice != "none"


def tool_names(req: ChatCompletionRequest) -> set[str]:
    return {t.function.name for t in req.tools or []}


def template_supports_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def render_messages(req: ChatCompletionRequest, native: bool
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for ``apply_chat_template``; tools is None when not rendered."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    if native:
        messages = [_native_message(m) for m in req.messages]
        return messages, (tools if tools_enabled(req) else None)
    messages = [_fallback_message(m) for m in req.messages]
    if tools_enabled(req):
        messages = _with_tool_section(messages, tools)
    return messages, None


def _arguments(call: ToolCallIn) -> Any:
    """Arguments as an object (templates expect one); the raw string if it is not JSON."""
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments


def _native_message(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": _arguments(c)}} for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def hermes_call_text(name: str, arguments: Any) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments},
                                        ensure_ascii=False) + "\n</tool_call>"


def _fallback_message(m: ChatMessage) -> dict[str, Any]:
    if m.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m.text()}\n</tool_response>"}
    text = m.text()
    if m.tool_calls:
        calls = [hermes_call_text(c.function.name, _arguments(c)) for c in m.tool_calls]
        text = "\n".join(([text] if text else []) + calls)
    return {"role": m.role, "content": text}


def _with_tool_section(messages: list[dict[str, Any]],
                       tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    section = FALLBACK_INSTRUCTIONS.format(tools=listed)
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0]
        merged = f"{first['content']}\n\n{section}" if first["content"] else section
        return [{**first, "content": merged}, *messages[1:]]
    return [{"role": "system", "content": section}, *messages]

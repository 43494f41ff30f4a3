"""Structured outputs: the grammar a chat request's output must match, built and checked in P0.

    response_format json_object / json_schema   ──► GrammarSpec("json_object" | "json_schema")
    tools + tool_choice "required" / named,
    tools with strict: true, or tools beside a
    JSON response_format                        ──► GrammarSpec("lark"): the tool-call format
                                                    of ``tool_call_parser``, each call's JSON
                                                    matching its tool's parameters

The engine compiles the spec (``encore.grammar``) and masks every sampled token with it, so the
output parses: JSON that the schema accepts, or calls that the server's tool parser reads back
with arguments that the tool's schema accepts. A schema the grammar engine cannot use is a 400
naming the field and the feature.
"""

from __future__ import annotations

import json
from typing import Any

from encore.grammar import GrammarError, check_grammar
from encore.protocol.messages import GrammarSpec
from encore.server.errors import invalid
from encore.server.schemas import ChatCompletionRequest, ResponseFormat, Tool
from encore.server.tool_parsers import HERMES_CLOSE, HERMES_OPEN

# free text that does not start a hermes call; the lazy lexeme ends at the first call tag
_HERMES_TEXT = 'TEXT: /(.|\\n)*/ & ~/(.|\\n)*<tool_call>(.|\\n)*/\ntext_call[lazy]: ' \
               '/(.|\\n)*<tool_call>\\n/'
# free text that llama3_json's parser does not read as a call (it does not start with "{")
_LLAMA3_TEXT = "TEXT: /\\s*/ | /\\s*[^\\s{](.|\\n)*/"
_COMPACT = {"whitespace_flexible": False}


def canonical_json(value: Any) -> str:
    """The text a schema is compiled and cached by (key order kept: it is output order)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def format_grammar(fmt: ResponseFormat | None, param: str) -> GrammarSpec | None:
    """The grammar of a ``response_format`` (chat) or ``text.format`` (responses)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GrammarSpec("json_object")
    schema = fmt.json_schema_body()
    if schema is None:
        raise invalid("a json_schema response format needs a 'schema'", param)
    return GrammarSpec("json_schema", canonical_json(schema))


def checked(spec: GrammarSpec, param: str) -> GrammarSpec:
    """``spec``, or a 400 naming ``param`` and what the grammar engine refused."""
    try:
        check_grammar(spec)
    except GrammarError as e:
        what = ("uses a JSON Schema feature that is not supported" if e.unsupported
                else "is not a valid JSON schema")
        raise invalid(f"{param} {what}: {e}", param) from None
    return spec


def chat_grammar(req: ChatCompletionRequest, parser: str) -> GrammarSpec | None:
    """The grammar of a chat request's output (None: free text); 400 for what cannot be
    enforced. Blocking (schemas are checked): call it off the event loop."""
    fmt_param = ("response_format.json_schema.schema"
                 if req.response_format and req.response_format.type == "json_schema"
                 else "response_format")
    content = format_grammar(req.response_format, fmt_param)
    tools = _enforced_tools(req)
    if (content is not None or tools is not None) and req.min_tokens:
        raise invalid("min_tokens is not supported with structured outputs (a complete "
                      "grammar may allow nothing but the end)", "min_tokens")
    if content is not None:
        checked(content, fmt_param)
    if tools is None:
        return content
    for i, tool in tools:
        checked(GrammarSpec("json_schema", canonical_json(_parameters(tool))),
                f"tools[{i}].function.parameters")
    forced = req.tool_choice not in (None, "auto")
    lark = _tool_lark(parser, [t for _, t in tools], content, free_text=not forced,
                      parallel=req.parallel_tool_calls is not False)
    return checked(GrammarSpec("lark", lark), "tools")


def _enforced_tools(req: ChatCompletionRequest) -> list[tuple[int, Tool]] | None:
    """The tools whose calls the grammar spells (with their index in ``tools``), or None when
    the request's tools need no grammar: ``tool_choice`` "required" or a named function, a
    strict tool, or tools beside a JSON ``response_format`` (the output is a call or JSON)."""
    if not req.tools or req.tool_choice == "none":
        return None
    choice = req.tool_choice
    tools = list(enumerate(req.tools))
    if choice is not None and not isinstance(choice, str):
        return [(i, t) for i, t in tools if t.function.name == choice.function.name]
    json_format = req.response_format is not None and req.response_format.type != "text"
    if choice == "required" or json_format or any(t.function.strict for t in req.tools):
        return tools
    return None


def _parameters(tool: Tool) -> dict[str, Any]:
    """A tool's parameters schema (no parameters: an object, as OpenAI takes it)."""
    params = tool.function.parameters
    return dict(params) if params else {"type": "object"}


def _call_schema(tool: Tool, args_key: str) -> dict[str, Any]:
    """The JSON of one call of ``tool``: ``{"name": <its name>, args_key: <its arguments>}``.
    The parameters' ``$defs`` move to the call's root, and their ``$ref``s with them."""
    params = _parameters(tool)
    defs = {k: params.pop(k) for k in ("$defs", "definitions") if k in params}
    params = _rebase_refs(params, f"#/properties/{args_key}")
    schema: dict[str, Any] = {
        "type": "object", "properties": {"name": {"const": tool.function.name},
                                         args_key: params},
        "required": ["name", args_key], "additionalProperties": False,
        "x-guidance": _COMPACT, **defs}
    return schema


def _rebase_refs(value: Any, base: str) -> Any:
    """``value`` with local ``$ref``s into itself (``#/...``, not ``#/$defs``) under ``base``."""
    if isinstance(value, dict):
        out = {k: _rebase_refs(v, base) for k, v in value.items()}
        ref = out.get("$ref")
        if (isinstance(ref, str) and ref.startswith("#")
                and not ref.startswith(("#/$defs/", "#/definitions/"))):
            out["$ref"] = base + ref[1:]
        return out
    if isinstance(value, list):
        return [_rebase_refs(v, base) for v in value]
    return value


def _json_rule(name: str, schema: dict[str, Any]) -> str:
    return f"{name}: %json {canonical_json({**schema, 'x-guidance': _COMPACT})}"


def _content_json(content: GrammarSpec) -> dict[str, Any]:
    return {"type": "object"} if content.kind == "json_object" else json.loads(content.spec)


def _tool_lark(parser: str, tools: list[Tool], content: GrammarSpec | None, free_text: bool,
               parallel: bool) -> str:
    """A Lark grammar: a call (or, for hermes with ``parallel``, several) of ``tools`` in the
    format of ``parser``, or else the JSON ``content``, or else (``free_text``) any text
    that does not start a call."""
    args_key = "arguments" if parser == "hermes" else "parameters"
    rules = [_json_rule(f"call_{i}", _call_schema(t, args_key)) for i, t in enumerate(tools)]
    rules.append("call: " + " | ".join(f"call_{i}" for i in range(len(tools))))
    if content is not None:
        rules.append(_json_rule("content", _content_json(content)))
    if parser == "hermes":
        close, again = json.dumps("\n" + HERMES_CLOSE), json.dumps(f"\n{HERMES_OPEN}\n")
        more = f" ({again} call {close})*" if parallel else ""
        rules.append(f"calls: call {close}{more}")
        start = [f"{json.dumps(HERMES_OPEN + chr(10))} calls"]
        if content is not None:
            start.append("content")
        elif free_text:
            start = ["TEXT", "text_call calls"]
            rules.append(_HERMES_TEXT)
    else:
        start = ["call"]
        if content is not None:
            start.append("content")
        elif free_text:
            start.append("TEXT")
            rules.append(_LLAMA3_TEXT)
    return "\n".join(["start: " + " | ".join(start), *rules]) + "\n"

"""Tool-call parsers: whole-text and streaming, Hermes and Llama-3 JSON."""

from __future__ import annotations

import json

import pytest

from encore.server.tool_parsers import StreamingToolParser, parse_hermes, parse_llama3_json

NAMES = {"get_weather", "search"}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def test_hermes_single_call() -> None:
    out = parse_hermes(CALL, NAMES)
    assert out.content is None and len(out.tool_calls) == 1
    call = out.tool_calls[0]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    api = call.to_api()
    assert api["type"] == "function" and api["id"].startswith("call_")


def test_hermes_several_calls_and_text_around() -> None:
    text = ('Let me check.\n' + CALL + '\n<tool_call>\n{"name": "search", "arguments": '
            '{"q": "rain"}}\n</tool_call> done')
    out = parse_hermes(text, NAMES)
    assert [c.name for c in out.tool_calls] == ["get_weather", "search"]
    assert out.content == "Let me check.\n\n done"
    assert len({c.id for c in out.tool_calls}) == 2


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',  # bad JSON
    '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # unknown tool
    '<tool_call>{"name": "search", "arguments": "q"}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "search", "arguments": {}}',  # never closed
    "plain answer",
])
def test_hermes_malformed_is_plain_content(text: str) -> None:
    out = parse_hermes(text, NAMES)
    assert out.tool_calls == [] and out.content == text


def test_hermes_keeps_a_bad_block_as_content_next_to_a_good_one() -> None:
    bad = '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
    out = parse_hermes(bad + CALL, NAMES)
    assert [c.name for c in out.tool_calls] == ["get_weather"] and out.content == bad


@pytest.mark.parametrize("text", [
    '{"name": "search", "parameters": {"q": "x"}}',
    '<|python_tag|>{"name": "search", "arguments": {"q": "x"}}',
    '  {"name": "search", "arguments": {"q": "x"}}\n',
])
def test_llama3_json_call(text: str) -> None:
    out = parse_llama3_json(text, NAMES)
    assert out.content is None and [c.name for c in out.tool_calls] == ["search"]
    assert json.loads(out.tool_calls[0].arguments) == {"q": "x"}


@pytest.mark.parametrize("text", [
    'Sure: {"name": "search", "parameters": {}}',  # text before: not a call
    '{"name": "search", "parameters": {',  # bad JSON
    '{"name": "other", "parameters": {}}',  # unknown tool
    "hello",
])
def test_llama3_json_malformed_is_plain_content(text: str) -> None:
    out = parse_llama3_json(text, NAMES)
    assert out.tool_calls == [] and out.content == text


def _stream(parser: str, text: str, step: int = 3) -> tuple[list[str], list[str]]:
    p = StreamingToolParser(parser, NAMES)
    pieces, names = [], []
    for i in range(0, len(text), step):
        content, calls = p.feed(text[i:i + step])
        pieces.append(content)
        names += [c.name for c in calls]
    content, calls = p.finish()
    pieces.append(content)
    names += [c.name for c in calls]
    return pieces, names


def test_streaming_hermes_holds_back_tags_and_emits_calls() -> None:
    pieces, names = _stream("hermes", "Checking <" + CALL[1:] + " ok" + CALL)
    assert names == ["get_weather", "get_weather"]
    assert "".join(pieces) == "Checking  ok"
    assert not any("<" in p for p in pieces)


def test_streaming_hermes_plain_text_and_unfinished_call() -> None:
    pieces, names = _stream("hermes", "a < b <tool_ca")
    assert names == [] and "".join(pieces) == "a < b <tool_ca"
    pieces, names = _stream("hermes", '<tool_call>{"name": "x"}</tool_call>')
    assert names == [] and "".join(pieces) == '<tool_call>{"name": "x"}</tool_call>'


def test_streaming_llama3() -> None:
    text = '<|python_tag|>{"name": "search", "arguments": {"q": "x"}}'
    pieces, names = _stream("llama3_json", text)
    assert names == ["search"] and "".join(pieces) == ""
    pieces, names = _stream("llama3_json", "just text {not json")
    assert names == [] and "".join(pieces) == "just text {not json"
    assert pieces[0] == "jus"  # plain text is not held back
    pieces, names = _stream("llama3_json", '{"name": "search", "arguments": {')
    assert names == [] and "".join(pieces) == '{"name": "search", "arguments": {'

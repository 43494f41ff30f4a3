"""Tool calling through /v1/chat/completions against a scripted engine (official client)."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from encore.configs.loading import build_config
from encore.server.app import create_app
from encore.server.sse import parse_sse
from tests.unit.fake_engine_client import FakeEngineClient, FakeTokenizer
from tests.unit.server_helpers import chat_body, serve

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
HERMES = ('Let me look.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
          '</tool_call>')
LLAMA3 = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
OUTPUTS = {"hermes": HERMES, "llama3_json": LLAMA3}


def _engine(text: str = "Hi") -> FakeEngineClient:
    return FakeEngineClient(script=lambda req, i: text, max_model_len=4096)


def _client(http: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http,
                         max_retries=0)


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_tool_call_non_streaming(parser: str) -> None:
    with serve(_engine(OUTPUTS[parser]), tool_call_parser=parser) as (http, _, _):
        r = _client(http).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "weather?"}],
            tools=TOOLS)  # type: ignore[arg-type]
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == ("Let me look." if parser == "hermes" else None)
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_tool_call_streaming(parser: str) -> None:
    with serve(_engine(OUTPUTS[parser]), tool_call_parser=parser) as (http, _, _):
        stream = _client(http).chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "weather?"}],
            tools=TOOLS, stream=True)  # type: ignore[arg-type]
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert text == ("Let me look." if parser == "hermes" else "")
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments or "") == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_streaming_several_calls_have_increasing_indexes() -> None:
    two = HERMES + '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    with serve(_engine(two)) as (http, _, _):
        r = http.post("/v1/chat/completions", json=chat_body(tools=TOOLS, stream=True))
    chunks = [e for e in parse_sse(r.content) if e != "[DONE]"]
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0, 1]
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris", "Oslo"]


def test_malformed_or_unknown_tool_output_is_content() -> None:
    bad = '<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>'
    with serve(_engine(bad)) as (http, _, _):
        body = http.post("/v1/chat/completions", json=chat_body(tools=TOOLS)).json()
        s = http.post("/v1/chat/completions", json=chat_body(tools=TOOLS, stream=True))
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": bad}
    assert choice["finish_reason"] == "stop"
    chunks = [e for e in parse_sse(s.content) if e != "[DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == bad
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_tool_choice_none_neither_renders_nor_parses() -> None:
    with serve(_engine(HERMES)) as (http, engine, _):
        body = http.post("/v1/chat/completions",
                         json=chat_body(tools=TOOLS, tool_choice="none")).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": HERMES}
    assert "get_weather" not in bytes(engine.requests[0].prompt_token_ids).decode()


def test_plain_text_with_tools_streams_unchanged() -> None:
    with serve(_engine("no tools needed < 3")) as (http, _, _):
        body = http.post("/v1/chat/completions", json=chat_body(
            tools=TOOLS, tool_choice="auto")).json()
    assert body["choices"][0]["message"] == {"role": "assistant",
                                             "content": "no tools needed < 3"}
    assert body["choices"][0]["finish_reason"] == "stop"


def test_fallback_rendering_of_tools_calls_and_results() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    with serve(_engine()) as (http, engine, _):
        r = http.post("/v1/chat/completions", json=chat_body(messages=messages, tools=TOOLS))
        assert r.status_code == 200, r.text
    prompt = bytes(engine.requests[0].prompt_token_ids).decode()
    assert prompt.startswith("<system>be brief\n\n# Tools")
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in prompt
    assert ('<assistant><tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call>\n') in prompt
    assert prompt.endswith("<user><tool_response>\nsunny\n</tool_response>\n<assistant>")


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools[0].function.name"),
    ({"tools": TOOLS + TOOLS}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "other"}}},
     "tool_choice"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {}}]}]},
     "messages[0].tool_calls[0].function.name"),
])
def test_tool_request_validation(extra: dict[str, Any], param: str) -> None:
    with serve() as (http, engine, _):
        r = http.post("/v1/chat/completions", json=chat_body(**extra))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert engine.requests == []


class _NativeToolTokenizer(FakeTokenizer):
    """A tokenizer whose template supports tools: it records what it was given."""

    chat_template = "{% if tools %}...{% endif %}"

    def __init__(self) -> None:
        self.calls: list[tuple[list[dict[str, Any]], Any]] = []

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None) -> str:
        self.calls.append((messages, tools))
        return super().apply_chat_template(messages, add_generation_prompt)


def test_native_template_gets_tools_calls_and_tool_messages() -> None:
    tok = _NativeToolTokenizer()
    app = create_app(build_config(), _engine(), tokenizer=tok)
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    with TestClient(app) as http:
        deadline = time.monotonic() + 5
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = http.post("/v1/chat/completions", json=chat_body(messages=messages, tools=TOOLS))
        assert r.status_code == 200, r.text
    rendered, tools = tok.calls[-1]
    assert tools == TOOLS
    assert rendered[1]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                        "arguments": {"city": "Paris"}}
    assert rendered[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


@pytest.mark.parametrize("stream", [False, True])
def test_an_agent_programs_tool_calls_reach_the_engine(stream: bool) -> None:
    """TTL pins learn per tool: a program's turn ending in tool calls tells the engine which
    tools run (not without a program, nor after its last step)."""
    engine = _engine(HERMES)
    with serve(engine, tool_call_parser="hermes") as (http, _, _):
        client = _client(http)
        for extra in ({"prompt_cache_key": "job-1"}, {}, {"job_id": "job-2",
                                                          "is_last_step": True}):
            r = client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "weather?"}],
                tools=TOOLS, stream=stream, extra_body=extra)  # type: ignore[arg-type]
            if stream:
                list(r)  # type: ignore[arg-type]
    assert engine.tools_called == [("job-1", ["get_weather"])]

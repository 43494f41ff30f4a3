"""Tool calls round-trip through the ``openai`` client against the real server, per parser.

The server runs a scripted model (tests/helpers/scripted_model.py, loaded as the model plugin
``python:tests.helpers.scripted_model:build``) with SmolLM2's tokenizer, so its output is
known: a tool call, then, once the prompt holds the tool's result, a final answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from encore.configs.model_source import ModelLoadError, default_gguf_path, resolve_model
from encore.configs.types import ModelConfig
from tests.e2e.e2e_server import API_KEY, Server, metric, start_server, stop_server
from tests.helpers.scripted_model import SCRIPT_ENV

PLUGIN = "python:tests.helpers.scripted_model:build"
CALLS = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "llama3_json": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
}
MALFORMED = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>',
    "llama3_json": '{"name": "get_weather", "parameters": {"city": ',
}
ANSWER = "It is sunny and 21 degrees in Paris."
RESULT = '{"city": "Paris", "weather": "sunny", "celsius": 21}'
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def script(parser: str) -> list[dict[str, str]]:
    return [{"when": "<tool_response>", "reply": ANSWER},  # the fallback template's tool turn
            {"when": "BROKEN", "reply": MALFORMED[parser]},
            {"reply": CALLS[parser]}]


@pytest.fixture(scope="module", params=sorted(CALLS))
def scripted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[str, Server]]:
    parser = request.param
    tmp = tmp_path_factory.mktemp(f"scripted-{parser}")
    (tmp / "script.json").write_text(json.dumps(script(parser)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SCRIPT_ENV, str(tmp / "script.json"))
        server = start_server(tmp, "--model", PLUGIN, "--tokenizer", str(default_gguf_path()),
                              "--tool-call-parser", parser)
    yield parser, server
    stop_server(server)


@pytest.fixture()
def client(scripted: tuple[str, Server]) -> openai.OpenAI:
    return openai.OpenAI(base_url=scripted[1].v1, api_key=API_KEY, max_retries=0, timeout=60)


def chat(client: openai.OpenAI, messages: list[dict[str, Any]], stream: bool,
         **extra: Any) -> dict[str, Any]:
    """One completion as {content, tool_calls: [{id, name, arguments}], finish_reason}."""
    kw: dict[str, Any] = dict(model="scripted_model", messages=messages, tools=TOOLS,
                              temperature=0, max_tokens=64, extra_body=extra or None)
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in choice.message.tool_calls or []]
        return {"content": choice.message.content, "tool_calls": calls,
                "finish_reason": choice.finish_reason}
    return accumulate(client.chat.completions.create(**kw, stream=True))


def accumulate(stream: Any) -> dict[str, Any]:
    """Fold streamed deltas the way a client does: content pieces, tool calls by index."""
    content, calls, finish = [], {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = tc.id or call["id"]
            call["name"] += (tc.function and tc.function.name) or ""
            call["arguments"] += (tc.function and tc.function.arguments) or ""
        finish = chunk.choices[0].finish_reason or finish
    return {"content": "".join(content) or None,
            "tool_calls": [calls[i] for i in sorted(calls)], "finish_reason": finish}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_tool_call_round_trip(client: openai.OpenAI, scripted: tuple[str, Server],
                              stream: bool) -> None:
    """As an agent program (``prompt_cache_key``): the server reports the call to the engine,
    the first turn's KV stays pinned through the tool, and the second turn hits the pin."""
    program = {"prompt_cache_key": f"agent-{scripted[0]}-{stream}"}
    hits = metric(scripted[1], "encore:pin_hits_total")
    first = chat(client, ASK, stream, **program)
    assert first["finish_reason"] == "tool_calls"
    assert not first["content"]
    (call,) = first["tool_calls"]
    assert call["id"] and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris"}

    turn = [*ASK,
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": call["id"], "type": "function",
                "function": {"name": call["name"], "arguments": call["arguments"]}}]},
            {"role": "tool", "tool_call_id": call["id"], "content": RESULT}]
    second = chat(client, turn, stream, **program, is_last_step=True)
    assert second == {"content": ANSWER, "tool_calls": [], "finish_reason": "stop"}
    assert metric(scripted[1], "encore:pin_hits_total") == hits + 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_malformed_tool_json_is_plain_content(client: openai.OpenAI, scripted: tuple[str, Server],
                                             stream: bool) -> None:
    out = chat(client, [{"role": "user", "content": "BROKEN: weather in Paris?"}], stream)
    assert out == {"content": MALFORMED[scripted[0]], "tool_calls": [], "finish_reason": "stop"}


def test_without_tools_the_call_text_is_content(client: openai.OpenAI,
                                                scripted: tuple[str, Server]) -> None:
    assert [m.id for m in client.models.list().data] == ["scripted_model"]
    r = client.chat.completions.create(model="scripted_model", messages=ASK, temperature=0)
    assert r.choices[0].message.content == CALLS[scripted[0]]
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls


# ---- the model plugin hook itself (no server) ---------------------------------------------


@pytest.mark.parametrize("spec", ["python:", "python:mod", "python:mod:", "python:a b:f",
                                  "python:m:f:g", "python:1mod:f"])
def test_bad_plugin_spec_is_one_line(spec: str) -> None:
    with pytest.raises(ModelLoadError, match="is not python:MODULE:FUNCTION") as info:
        resolve_model(ModelConfig(model=spec))
    assert "\n" not in str(info.value)


def test_plugin_spec_resolves_without_importing() -> None:
    resolved = resolve_model(ModelConfig(model="python:no_such_pkg.models:build"))
    assert (resolved.path, resolved.load_format, resolved.name) == (
        "no_such_pkg.models:build", "python", "models")
    with pytest.raises(ModelLoadError, match="does not apply to model plugin"):
        resolve_model(ModelConfig(model="python:m:f", load_format="gguf"))


@pytest.mark.parametrize(("spec", "match"), [
    ("python:no_such_pkg.models:build", "module 'no_such_pkg.models' cannot be imported"),
    ("python:tests.helpers.scripted_model:nope", "has no function 'nope'"),
    ("python:builtins:print", "must return \\(model, ModelArch\\)"),  # returns None
])
def test_bad_plugin_target_is_one_line(spec: str, match: str) -> None:
    import torch

    from encore.worker.attention.torch_backend import TorchAttentionBackend
    from encore.worker.loader import load_model

    with pytest.raises(ModelLoadError, match=match) as info:
        load_model(ModelConfig(model=spec), torch.device("cpu"), torch.float32,
                   TorchAttentionBackend())
    assert "\n" not in str(info.value)

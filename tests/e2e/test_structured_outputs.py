"""Structured outputs through the official openai client (and LangChain) on a real server:
JSON schemas from pydantic models, enforced tool calls, streaming with n > 1 and logprobs,
stop strings, and the 400s for schemas the grammar engine cannot use."""

from __future__ import annotations

import enum
import json
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field, create_model

from tests.e2e.e2e_server import API_KEY
from tests.unit.server_helpers import api_error

pytestmark = pytest.mark.slow

NUM_SCHEMAS = 50
MAX_TOKENS = 160


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class Point(BaseModel):
    x: int = Field(ge=-50, le=50)
    y: int = Field(ge=-50, le=50)


class Pet(BaseModel):
    name: str = Field(max_length=12)
    kind: Literal["cat", "dog", "fish"]
    age: int | None = Field(ge=0, le=30)


# (annotation, field) pairs the schemas are drawn from: strings are bounded so that a small
# model cannot spend its whole budget inside one
FIELDS: list[tuple[Any, Any]] = [
    (str, Field(max_length=16)),
    (int, Field(ge=0, le=1000)),
    (float, Field(ge=-1.0, le=1.0)),
    (bool, Field()),
    (Literal["small", "medium", "large"], Field()),
    (Color, Field()),
    (list[int], Field(max_length=3)),
    (list[Literal["a", "b", "c"]], Field(max_length=4)),
    (str | None, Field(max_length=10)),
    (int | bool, Field()),
    (Point, Field()),
    (list[Pet], Field(max_length=2)),
    (Pet | Point, Field()),
]


def schemas(n: int) -> list[type[BaseModel]]:
    """``n`` models, each with 1-4 fields drawn from FIELDS (seeded)."""
    rng = random.Random(18)
    models = []
    for i in range(n):
        chosen = rng.sample(range(len(FIELDS)), rng.randint(1, 4))
        fields = {f"f{j}_{k}": FIELDS[k] for j, k in enumerate(chosen)}
        models.append(create_model(f"Schema{i}", **fields))
    return models


def test_fifty_pydantic_schemas_parse_and_validate(client, model) -> None:
    client = client.with_options(timeout=600)  # 50 requests queue behind 8 running ones

    def one(schema: type[BaseModel]) -> tuple[Any, str]:
        # greedy decoding of a small model can repeat a digit forever ("1.000..." is a valid
        # number): a frequency penalty ends such loops, the grammar keeps the JSON valid
        done = client.chat.completions.parse(
            model=model, response_format=schema, temperature=0, max_tokens=MAX_TOKENS,
            frequency_penalty=1.0,
            messages=[{"role": "user", "content": f"Fill in a {schema.__name__} as JSON."}])
        choice = done.choices[0]
        return choice.message.parsed, choice.message.content or ""

    models = schemas(NUM_SCHEMAS)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, models))
    for schema, (parsed, content) in zip(models, results, strict=True):
        assert isinstance(parsed, schema), content
        assert schema.model_validate(json.loads(content)) == parsed


class Weather(BaseModel):
    city: str = Field(max_length=20)
    unit: Literal["celsius", "fahrenheit"]
    days: int = Field(ge=1, le=7)


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                      "parameters": Weather.model_json_schema()}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                      "parameters": {"type": "object", "properties": {
                                          "tz": {"enum": ["UTC", "CET"]}},
                                          "required": ["tz"]}}},
]


@pytest.mark.parametrize("choice", ["required",
                                    {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_choice_always_calls_with_valid_arguments(client, model, choice) -> None:
    done = client.chat.completions.create(
        model=model, tools=TOOLS, tool_choice=choice, n=3, temperature=1.0, seed=5,
        max_tokens=MAX_TOKENS, parallel_tool_calls=False,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    for c in done.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls, c.message
        for call in c.message.tool_calls:
            args = json.loads(call.function.arguments)
            if call.function.name == "get_weather":
                Weather.model_validate(args)
            else:
                assert choice == "required" and args["tz"] in ("UTC", "CET")


def test_streaming_n2_with_logprobs_and_stop_strings(client, model) -> None:
    stream = client.chat.completions.create(
        model=model, response_format={"type": "json_object"}, n=2, logprobs=True,
        top_logprobs=2, stream=True, temperature=0.8, seed=1, max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": "Describe a cat as a JSON object."}])
    texts, reasons, lps = ["", ""], [None, None], [0, 0]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
            lps[c.index] += len(c.logprobs.content) if c.logprobs and c.logprobs.content else 0
    for text, reason, n in zip(texts, reasons, lps, strict=True):
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
        assert n > 0
    stopped = client.chat.completions.create(
        model=model, response_format={"type": "json_object"}, stop=[","], max_tokens=MAX_TOKENS,
        temperature=0, messages=[{"role": "user", "content": "A JSON object with two keys."}])
    stopped_choice = stopped.choices[0]
    assert stopped_choice.finish_reason == "stop" and "," not in stopped_choice.message.content


def test_langchain_with_structured_output_returns_the_model(server, model) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.v1, api_key=API_KEY, model=model, temperature=0,
                     max_tokens=MAX_TOKENS, max_retries=0, timeout=300)
    result = llm.with_structured_output(Pet).invoke("Invent a pet.")
    assert isinstance(result, Pet)


def test_bad_schemas_are_400s_and_the_server_stays_healthy(server, client, model) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def post(body: dict[str, Any]) -> httpx.Response:
        return httpx.post(server.v1 + "/chat/completions", headers=headers, timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": "hi"}], **body})

    def fmt(schema: Any) -> dict[str, Any]:
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "x", "schema": schema}}}

    err = api_error(post(fmt({"not": {"type": "string"}})), 400,
                    "response_format.json_schema.schema")
    assert "not supported" in err["message"] and "not" in err["message"]
    err = api_error(post(fmt({"type": "integer", "minimum": "zero"})), 400)
    api_error(post(fmt({"type": "strange"})), 400, "response_format.json_schema.schema")
    api_error(post({"response_format": {"type": "json_schema"}}), 400, "response_format")
    api_error(post({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"not": {}}}}}}],
        "tool_choice": "required"}), 400, "tools[0].function.parameters")
    api_error(post({"response_format": {"type": "json_object"}, "min_tokens": 3}), 400)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "yaml"})
    assert httpx.get(server.base_url + "/health").status_code == 200
    ok = client.chat.completions.create(model=model, max_tokens=4,
                                        messages=[{"role": "user", "content": "hi"}])
    assert ok.choices[0].finish_reason in ("stop", "length")

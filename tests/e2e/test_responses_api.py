"""/v1/responses through the official openai client on a real server: a stored two-turn
conversation that reuses its KV, streaming events, structured text, tool calls with their
outputs as items, read back and delete, and bad input as 4xx."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

INSTRUCTIONS = ("You are a terse assistant for a travel agency. Answer in one short sentence. "
                "Never apologise, never ask questions back, and prefer concrete names.")


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population_millions: int = Field(ge=0, le=40)


def test_two_turn_conversation_reuses_the_stored_turns_kv(client, model) -> None:
    first = client.responses.create(model=model, instructions=INSTRUCTIONS, temperature=0,
                                    input="Name a city in Italy.", max_output_tokens=24)
    assert first.status in ("completed", "incomplete") and first.output_text
    second = client.responses.create(model=model, instructions=INSTRUCTIONS, temperature=0,
                                     input="And one in Spain?", max_output_tokens=24,
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.output_text
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0
    got = client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)


def test_stream_events_and_structured_text(client, model) -> None:
    with client.responses.stream(model=model, input="Describe Lisbon.", text_format=City,
                                 temperature=0, max_output_tokens=80) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed" and "response.output_text.delta" in types
    assert isinstance(final.output_parsed, City)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert City.model_validate_json(deltas) == final.output_parsed


def test_tool_call_and_its_output_as_the_next_input(client, model) -> None:
    tools = [{"type": "function", "name": "book_hotel", "description": "Book a hotel",
              "parameters": {"type": "object", "properties": {
                  "city": {"type": "string", "maxLength": 20},
                  "nights": {"type": "integer", "minimum": 1, "maximum": 14},
                  "tier": {"enum": ["budget", "luxury"]}},
                  "required": ["city", "nights", "tier"], "additionalProperties": False}}]
    first = client.responses.create(model=model, tools=tools, tool_choice="required",
                                    input="Book me two nights in Rome.", temperature=0,
                                    max_output_tokens=80)
    calls = [o for o in first.output if o.type == "function_call"]
    assert calls and first.status == "completed"
    args = json.loads(calls[0].arguments)
    assert 1 <= args["nights"] <= 14 and args["tier"] in ("budget", "luxury")
    second = client.responses.create(
        model=model, tools=tools, previous_response_id=first.id, temperature=0,
        max_output_tokens=16, tool_choice="none",
        input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                "output": '{"booked": true}'}])
    assert second.output_text and second.usage.input_tokens_details.cached_tokens > 0



def test_bad_input_is_a_4xx_and_the_server_stays_healthy(server, client, model) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=model, input="hi", previous_response_id="resp_unknown")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=model, input="hi", prompt_cache_retention="24h",
                                extra_body={"prompt_cache_options": {"ttl": "5m"}})
    assert e.value.body["param"] == "prompt_cache_retention"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                       prompt_cache_retention="in_memory",
                                       extra_body={"prompt_cache_options": {"mode": "explicit"}})
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=model, input="hi", text={"format": {
            "type": "json_schema", "name": "x", "schema": {"type": "wat"}}})
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert client.responses.create(model=model, input="hi", max_output_tokens=2,
                                   store=False).output_text is not None

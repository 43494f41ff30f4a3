"""Chunk parts and breakpoint pins: how /v1/chat/completions tokenizes marked content parts.

Requests go through the official ``openai`` client to the app with SmolLM2's real tokenizer
and a scripted engine; the tests inspect the EngineRequest the server built.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from encore.configs.loading import build_config
from encore.configs.model_source import default_gguf_path
from encore.protocol.messages import EngineRequest
from encore.server.app import create_app
from encore.server.tokenizer import load_tokenizer
from tests.unit.fake_engine_client import FakeEngineClient, FakeTokenizer

DOC_A = ("The Encore serving daemon keeps a paged KV cache. Blocks are hashed by their "
         "prefix, so two prompts that share a prefix share blocks. ") * 3
DOC_B = ("Rotary position embeddings rotate each query and key by an angle proportional to "
         "its position; values carry no position at all. ") * 3
SHORT = "Answer briefly:"


@pytest.fixture(scope="module")
def tok() -> Any:
    return load_tokenizer(str(default_gguf_path()))


@contextmanager
def _serve(tokenizer: Any, **overrides: Any):
    """(openai client, engine) of an app on a scripted engine, ready to serve."""
    engine = FakeEngineClient(script=lambda req, i: "ok", max_model_len=8192)
    app = create_app(build_config(overrides=overrides), engine, tokenizer=tokenizer)
    with TestClient(app, raise_server_exceptions=False) as http:
        deadline = time.monotonic() + 5
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "fake engine never became ready"
            time.sleep(0.01)
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http,
                            max_retries=0), engine


def _chunk(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text, "prompt_cache_breakpoint": {"mode": "chunk"}}


def _text(text: str, **bp: Any) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "text", "text": text}
    if bp:
        part["prompt_cache_breakpoint"] = bp
    return part


def _send(tokenizer: Any, messages: list[dict[str, Any]], **kw: Any) -> EngineRequest:
    overrides = kw.pop("overrides", {})
    with _serve(tokenizer, **overrides) as (client, engine):
        client.chat.completions.create(model="fake-model", messages=messages,  # type: ignore
                                       max_tokens=2, **kw)
    return engine.requests[0]


def _error(tokenizer: Any, messages: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as e:
        _send(tokenizer, messages, **kw)
    assert isinstance(e.value.body, dict)
    return e.value.body


def _rendered(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    plain = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
              else "".join(p["text"] for p in m["content"])} for m in messages]
    return tokenizer.apply_chat_template(plain, add_generation_prompt=True)


def test_chunk_tokens_equal_standalone_tokenization(tok) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [_chunk(DOC_A), _chunk(DOC_B), _text(SHORT)]}]
    req = _send(tok, messages)
    ids = req.prompt_token_ids
    assert [ids[s:e] for s, e in req.chunks] == [tok.encode(DOC_A), tok.encode(DOC_B)]
    (a0, a1), (b0, b1) = req.chunks
    assert 0 < a0 < a1 == b0 < b1 < len(ids)  # sorted, disjoint (adjacent parts)
    assert tok.decode(ids, skip_special_tokens=False) == _rendered(tok, messages)
    assert req.pin_breakpoints == []


def test_a_chunk_has_the_same_tokens_wherever_it_appears(tok) -> None:
    first = _send(tok, [{"role": "user", "content": [_chunk(DOC_A), _chunk(DOC_B),
                                                     _text(SHORT)]}])
    second = _send(tok, [{"role": "system", "content": [_text("Context follows."),
                                                        _chunk(DOC_B)]},
                         {"role": "user", "content": [_text("Read this:"), _chunk(DOC_A)]}])

    def spans(r: EngineRequest) -> list[list[int]]:
        return [r.prompt_token_ids[s:e] for s, e in r.chunks]

    assert spans(first) == spans(second)[::-1]
    assert first.chunks != second.chunks[::-1]  # different positions, same tokens


def test_unmarked_requests_tokenize_exactly_as_before(tok) -> None:
    messages = [{"role": "user", "content": [_text(DOC_A), _text(SHORT, mode="implicit"),
                                             _text(DOC_B, mode="explicit")]}]
    req = _send(tok, messages)
    assert req.prompt_token_ids == tok.encode(_rendered(tok, messages))
    assert (req.chunks, req.pin_breakpoints) == ([], [])
    # the byte-level fake: a part's tokens are its bytes, so a chunk's span is its text
    req = _send(FakeTokenizer(), [{"role": "user", "content": [_text("a"), _chunk("doc")]}])
    assert bytes(req.prompt_token_ids).decode() == "<user>adoc\n<assistant>"
    assert req.chunks == [(len("<user>a"), len("<user>adoc"))]


def test_parts_mode_marks_long_parts_only(tok) -> None:
    assert len(tok.encode(SHORT)) < 32 <= len(tok.encode(DOC_A))
    messages = [{"role": "user", "content": [_text(DOC_A), _text(SHORT), _text(DOC_B)]},
                {"role": "assistant", "content": DOC_B},
                {"role": "user", "content": [_text(SHORT), _chunk("tiny")]}]
    req = _send(tok, messages, overrides={"chunk_reuse": "parts", "chunk_min_tokens": 32})
    ids = req.prompt_token_ids
    assert [ids[s:e] for s, e in req.chunks] == [tok.encode(DOC_A), tok.encode(DOC_B),
                                                 tok.encode("tiny")]
    marked = _send(tok, messages)  # default "marked": only the explicit chunk
    assert [marked.prompt_token_ids[s:e] for s, e in marked.chunks] == [tok.encode("tiny")]


def test_chunk_reuse_off_refuses_chunk_marks(tok) -> None:
    body = _error(tok, [{"role": "user", "content": [_text(SHORT), _chunk(DOC_A)]}],
                  overrides={"chunk_reuse": "off"})
    assert body["param"] == "messages[0].content[1].prompt_cache_breakpoint"
    assert "chunk reuse is off" in body["message"]


def test_explicit_breakpoint_pins_the_prefix_ending_with_its_part(tok) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [_text(DOC_A, mode="explicit", ttl="5m"),
                                             _text(SHORT)]}]
    req = _send(tok, messages, prompt_cache_key="agent-1")
    ((length, ttl),) = req.pin_breakpoints
    rendered = _rendered(tok, messages)
    cut = rendered.index(DOC_A) + len(DOC_A)
    assert ttl == 300.0 and req.chunks == []
    assert req.prompt_token_ids[:length] == tok.encode(rendered[:cut])
    assert tok.decode(req.prompt_token_ids, skip_special_tokens=False) == rendered


def test_explicit_breakpoint_without_ttl_takes_the_request_ttl(tok) -> None:
    messages = [{"role": "user", "content": [_chunk(DOC_B), _text(SHORT, mode="explicit")]}]
    req = _send(tok, messages, prompt_cache_key="k", prompt_cache_options={"ttl": "90s"})
    (start, end), ((length, ttl),) = req.chunks[0], req.pin_breakpoints
    assert (length, ttl) == (end + len(tok.encode(SHORT)), 90.0) and start < end


@pytest.mark.parametrize(("overrides", "ttl", "key", "words"), [
    ({}, "12h", "k", "exceeds"),
    ({}, "soon", "k", "duration"),
    ({}, "30m", "k", "exceeds"),  # cache.max_pin_ttl_s is 600 s by default
    ({}, "5m", None, "prompt_cache_key"),
    ({"enable_ttl_pins": False}, "5m", "k", "not supported"),
])
def test_bad_breakpoint_pins_are_refused(tok, overrides, ttl, key, words) -> None:
    messages = [{"role": "user", "content": [_text(DOC_A, mode="explicit", ttl=ttl)]}]
    body = _error(tok, messages, overrides=overrides, prompt_cache_key=key)
    assert body["param"] == "messages[0].content[0].prompt_cache_breakpoint.ttl"
    assert words in body["message"]


def test_a_template_that_repeats_a_chunk_is_refused() -> None:
    class EchoTwice(FakeTokenizer):
        def apply_chat_template(self, messages, add_generation_prompt=True, tools=None) -> str:
            return super().apply_chat_template(messages * 2, add_generation_prompt, tools)

    body = _error(EchoTwice(), [{"role": "user", "content": [_chunk("doc")]}])
    assert body["param"] == "messages[0].content[0].prompt_cache_breakpoint"


def test_a_tool_result_can_be_a_chunk() -> None:
    """The Hermes fallback wraps a tool message; the chunk is still its text alone."""
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"id": "c1", "type": "function",
                                 "function": {"name": "get", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": [_chunk("sunny")]}]
    req = _send(FakeTokenizer(), messages)
    ((start, end),) = req.chunks
    text = bytes(req.prompt_token_ids).decode()
    assert text[start:end] == "sunny" and "<tool_response>\nsunny\n</tool_response>" in text

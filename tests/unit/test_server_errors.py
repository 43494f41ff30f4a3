"""Every client mistake is an OpenAI error object with the right status; none crash us."""

from __future__ import annotations

import json
import random

import pytest

from encore.server.sse import parse_sse
from tests.unit.fake_engine_client import FakeEngineClient
from tests.unit.server_helpers import api_error, chat_body, serve


@pytest.mark.parametrize("field,value,param", [
    ("temperature", 3.0, "temperature"),
    ("temperature", "hot", "temperature"),
    ("top_p", 0, "top_p"),
    ("n", 0, "n"),
    ("max_tokens", 0, "max_tokens"),
    ("max_completion_tokens", -1, "max_completion_tokens"),
    ("presence_penalty", 9, "presence_penalty"),
    ("top_logprobs", 50, "top_logprobs"),
    ("stop", [""], "stop"),
    ("stop", 5, "stop"),
    ("messages", [], "messages"),
    ("messages", [{"role": "wizard", "content": "x"}], "messages[0].role"),
    ("messages", [{"role": "user", "content": [{"type": "image_url"}]}],
     "messages[0].content[0].type"),
    ("stop_token_ids", [-1], "stop_token_ids[0]"),
    ("stop_token_ids", [10**6], "stop_token_ids"),
    ("min_p", 2, "min_p"),
    ("stream_options", {"include_usage": "maybe"}, "stream_options.include_usage"),
    ("seed", 2**70, "seed"),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": "doc",
                   "prompt_cache_breakpoint": {"mode": "magic"}}]}],
     "messages[0].content[0].prompt_cache_breakpoint"),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": "doc",
                   "prompt_cache_breakpoint": {"mode": "chunk", "ttl": "30m"}}]}],
     "messages[0].content[0].prompt_cache_breakpoint"),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": "doc",
                   "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "5m"}}]}],
     "messages[0].content[0].prompt_cache_breakpoint.ttl"),  # no prompt_cache_key
    ("messages", [{"role": "assistant", "content": [{"type": "text", "text": "doc",
                   "prompt_cache_breakpoint": {"mode": "chunk"}}]}],
     "messages[0].content[0].prompt_cache_breakpoint"),
])
def test_chat_bad_values_name_the_param(field, value, param) -> None:
    with serve() as (client, _, _):
        api_error(client.post("/v1/chat/completions", json=chat_body(**{field: value})), 400, param)


def test_context_overflow_and_relationships() -> None:
    with serve(engine=FakeEngineClient(max_model_len=64)) as (client, _, _):
        api_error(client.post("/v1/chat/completions", json=chat_body(max_tokens=60)), 400,
                  "max_tokens")
        api_error(client.post("/v1/completions", json={"prompt": "x" * 100}), 400, "prompt")
        api_error(client.post("/v1/chat/completions", json=chat_body(top_logprobs=2)), 400,
                  "top_logprobs")
        api_error(client.post("/v1/chat/completions", json=chat_body(max_tokens=2, min_tokens=5)),
                  400, "min_tokens")
        api_error(client.post("/v1/completions", json={"prompt": []}), 400, "prompt")
        api_error(client.post("/v1/completions", json={"prompt": [1, 99999]}), 400, "prompt")
        api_error(client.post("/v1/completions", json={"prompt": "a", "suffix": "b"}), 400,
                  "suffix")
        api_error(client.post("/v1/completions", json={"prompt": "a", "logprobs": 99}), 400,
                  "logprobs")


def test_malformed_json_and_non_objects() -> None:
    with serve() as (client, _, _):
        for raw in [b"{", b"", b"\xff\xfe", b"null", b"[1,2]", b'"s"']:
            api_error(client.post("/v1/chat/completions", content=raw,
                             headers={"content-type": "application/json"}), 400)


def test_unknown_model_is_404() -> None:
    with serve() as (client, _, _):
        err = api_error(client.post("/v1/chat/completions", json=chat_body(model="x" * 500)), 404,
                   "model")
    assert len(err["message"]) < 200  # never echoes the whole input


def test_api_keys() -> None:
    with serve(api_keys=["k1", "k2"]) as (client, _, _):
        api_error(client.post("/v1/chat/completions", json=chat_body()), 401)
        api_error(client.post("/v1/chat/completions", json=chat_body(),
                         headers={"Authorization": "Bearer nope"}), 401)
        api_error(client.get("/v1/models", headers={"Authorization": "Basic k1"}), 401)
        ok = client.post("/v1/chat/completions", json=chat_body(),
                         headers={"Authorization": "Bearer k2"})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_body_too_large_is_413() -> None:
    with serve(max_body_bytes=2048) as (client, _, _):
        big = chat_body(messages=[{"role": "user", "content": "x" * 5000}])
        api_error(client.post("/v1/chat/completions", json=big), 413)

        def chunks():
            for _ in range(10):
                yield b" " * 1000
        api_error(client.post("/v1/chat/completions", content=chunks()), 413)


def test_queue_full_is_429_with_retry_after() -> None:
    with serve(max_waiting_requests=0) as (client, _, _):
        r = client.post("/v1/chat/completions", json=chat_body())
        api_error(r, 429)
        assert r.headers["retry-after"]


def test_not_ready_is_503_with_retry_after() -> None:
    with serve(engine=FakeEngineClient(ready=False), wait_ready=False) as (client, _, _):
        r = client.post("/v1/chat/completions", json=chat_body())
        api_error(r, 503)
        assert r.headers["retry-after"]
        assert client.get("/health").status_code == 503


def test_engine_error_is_500_or_error_event() -> None:
    with serve(engine=FakeEngineClient(fail_with="worker died")) as (client, _, _):
        err = api_error(client.post("/v1/chat/completions", json=chat_body()), 500)
        assert "worker died" in err["message"]
        events = parse_sse(client.post("/v1/completions", json={
            "prompt": "x", "stream": True}).content)
        assert events[-2]["error"]["message"] == "worker died" and events[-1] == "[DONE]"


def test_unknown_route_and_method() -> None:
    with serve() as (client, _, _):
        api_error(client.get("/v1/nothing"), 404)
        assert client.get("/v1/chat/completions").status_code == 405


def test_fuzzed_bodies_never_crash() -> None:
    rng = random.Random(0)
    values = [None, True, -1, 0, 1, 2**64, 1.5, float("1e308"), "", "x", [], [1], [[]],
              {}, {"a": 1}, ["a", 1], [{"type": "text"}]]
    fields = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "n",
              "stop", "seed", "logprobs", "top_logprobs", "echo", "stream", "stream_options",
              "stop_token_ids", "min_tokens", "top_k", "priority", "cache_salt", "best_of"]
    with serve() as (client, _, _):
        for _ in range(150):
            body = chat_body() if rng.random() < 0.5 else {"prompt": "hi"}
            for f in rng.sample(fields, 3):
                body[f] = rng.choice(values)
            path = rng.choice(["/v1/chat/completions", "/v1/completions"])
            r = client.post(path, content=json.dumps(body),
                            headers={"content-type": "application/json"})
            assert r.status_code in (200, 400, 404, 413), (body, r.text)
            if r.status_code != 200:
                assert "error" in r.json()
        assert client.get("/health").status_code == 200

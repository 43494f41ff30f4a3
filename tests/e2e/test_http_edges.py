"""Raw HTTP against the real server: bad bodies, keys, disconnects, graceful shutdown."""

from __future__ import annotations

import json
import math
import threading
import time

import httpx
import pytest

from encore.server.sse import parse_sse
from tests.e2e.e2e_server import API_KEY, start_server, stop_server

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _metric(server, name: str) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} missing")


def test_malformed_json_oversized_and_keys(server) -> None:
    url = server.v1 + "/chat/completions"
    r = httpx.post(url, content=b"{not json", headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url, content=b"x" * 300_000, headers=AUTH)
    assert r.status_code == 413
    assert httpx.post(url, json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(url, json={}).status_code == 401
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/metrics").status_code == 200


def _finite_numbers(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    return True


def test_extreme_sampling_values_stay_finite_and_tiny_temperature_is_greedy(server) -> None:
    """temperature or repetition_penalty 5e-324 made NaN logprobs: a 500, NaN in SSE, or an
    empty 200 (token 0 is <|endoftext|>)."""
    model = httpx.get(server.v1 + "/models", headers=AUTH).json()["data"][0]["id"]
    url = server.v1 + "/chat/completions"
    base = {"model": model, "messages": [{"role": "user", "content": "Name three colors."}],
            "max_tokens": 8, "logprobs": True, "top_logprobs": 3}
    with httpx.Client(headers=AUTH, timeout=120) as http:
        greedy = http.post(url, json={**base, "temperature": 0}).json()
        tiny = http.post(url, json={**base, "temperature": 5e-324})
        assert tiny.status_code == 200, tiny.text
        assert tiny.json()["choices"][0]["message"] == greedy["choices"][0]["message"]
        assert greedy["choices"][0]["message"]["content"]
        penalized = http.post(url, json={**base, "repetition_penalty": 5e-324, "seed": 1})
        assert penalized.status_code == 200, penalized.text
        assert penalized.json()["usage"]["completion_tokens"] >= 1
        stream = http.post(url, json={**base, "temperature": 5e-324, "repetition_penalty": 1e-30,
                                      "stream": True})
        assert b"NaN" not in stream.content and b"Infinity" not in stream.content
        events = parse_sse(stream.content)
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
        for body in [greedy, tiny.json(), penalized.json(), *events[:-1]]:
            assert _finite_numbers(body), body
        assert http.post(url, json={**base, "repetition_penalty": 3}).status_code == 400
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_hostile_bodies_are_400_and_keep_the_connection(server) -> None:
    """Each was a 500 that also dropped the keep-alive connection (an exception escaped)."""
    model = httpx.get(server.v1 + "/models", headers=AUTH).json()["data"][0]["id"]
    url = server.v1 + "/chat/completions"
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    deep = ("[" * 1000 + "]" * 1000).encode()
    lone = b'"x\\udc00"'  # a JSON string holding a lone surrogate escape
    chat_path, text_path = "chat/completions", "completions"
    bad = [(chat_path, json.dumps({**chat, "priority": -(2**63) - 1}).encode()),
           (chat_path, json.dumps({**chat, "top_k": 2**64}).encode()),
           (chat_path, json.dumps({**chat, "priority": 2**63}).encode()),
           (chat_path, json.dumps(chat).encode().replace(b'"hi"', lone)),
           (text_path, json.dumps({"model": model, "prompt": "P"}).encode().replace(b'"P"', lone)),
           (chat_path, json.dumps({**chat, "user": "U"}).encode().replace(b'"U"', deep))]
    tracebacks = server.log_tail(10_000).count("Traceback")
    with httpx.Client(headers={**AUTH, "content-type": "application/json"}, timeout=60) as http:
        for path, raw in bad:
            r = http.post(f"{server.v1}/{path}", content=raw)
            assert r.status_code == 400, (raw[:80], r.text)
            assert r.json()["error"]["type"] == "invalid_request_error"
        r = http.post(url, content=json.dumps(chat), headers={"content-type": "text/plain"})
        assert r.status_code == 415
        r = http.get(url)
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert http.post(url, json=chat).status_code == 200
        assert http.get(server.base_url + "/health").status_code == 200
    assert server.log_tail(10_000).count("Traceback") == tracebacks, server.log_tail()


def test_disconnect_mid_stream_frees_everything(server) -> None:
    model = httpx.get(server.v1 + "/models", headers=AUTH).json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, headers=AUTH,
                      timeout=60) as r:
        assert r.status_code == 200
        content_events = 0
        for line in r.iter_lines():
            content_events += '"content":"' in line and '"content":""' not in line
            if content_events >= 3:
                break  # leave mid-generation
        assert _metric(server, "encore:num_requests_running") == 1
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if (_metric(server, "encore:num_requests_running") == 0
                and _metric(server, "encore:kv_cache_usage_perc") == 0):
            break
        time.sleep(0.25)
    assert _metric(server, "encore:num_requests_running") == 0
    assert _metric(server, "encore:kv_cache_usage_perc") == 0
    assert _metric(server, "encore:generation_tokens_total") > 0


def test_sigterm_drains_running_requests_then_exits_0(tmp_path) -> None:
    srv = start_server(tmp_path, "--drain-timeout-s", "120")
    model = httpx.get(srv.v1 + "/models", headers=AUTH).json()["data"][0]["id"]
    result: dict = {}

    def request() -> None:
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": 12,
                "ignore_eos": True}
        r = httpx.post(srv.v1 + "/completions", json=body, headers=AUTH, timeout=120)
        result["status"] = r.status_code
        result["body"] = r.json()

    t = threading.Thread(target=request)
    t.start()
    deadline = time.monotonic() + 60
    while _metric(srv, "encore:num_requests_running") < 1:  # wait until it is running
        assert time.monotonic() < deadline and t.is_alive(), result
        time.sleep(0.05)
    assert stop_server(srv, timeout=150) == 0
    t.join(5)
    assert result.get("status") == 200, (result, srv.log_tail())
    assert result["body"]["usage"]["completion_tokens"] == 12

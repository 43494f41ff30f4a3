"""Raw HTTP against the real server: bad bodies, keys, disconnects, graceful shutdown."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

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

"""How a request names its agent program / conversation and its retention: the engine
request the server builds."""

from __future__ import annotations

from tests.unit.server_helpers import chat_body, serve


def test_x_session_id_names_the_program_when_the_body_does_not() -> None:
    """Routers keep a conversation on one replica by hashing X-Session-ID; the same header
    makes it an agent program here (TTL pins, program FCFS)."""
    with serve() as (client, engine, _):
        for headers, body in [({"X-Session-ID": "conv-7"}, chat_body(max_tokens=2)),
                              ({}, chat_body(max_tokens=2, session_id="conv-8")),
                              ({"X-Session-ID": "ignored"},
                               chat_body(max_tokens=2, prompt_cache_key="key-9"))]:
            r = client.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 200, r.text
        r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "hi",
                                                 "max_tokens": 2},
                        headers={"X-Session-ID": "conv-10"})
        assert r.status_code == 200, r.text
        r = client.post("/v1/chat/completions", json=chat_body(max_tokens=2),
                        headers={"X-Session-ID": "x" * 1025})
        assert r.status_code == 400 and r.json()["error"]["param"] == "X-Session-ID"
        assert client.get("/health").status_code == 200
    keys = [r.prompt_cache_key for r in engine.requests]
    assert keys == ["conv-7", "conv-8", "key-9", "conv-10"]


def test_retention_24h_asks_the_engine_to_persist_the_prompt() -> None:
    with serve() as (client, engine, _):
        for retention in ("24h", "in_memory", None):
            body = chat_body(max_tokens=2)
            if retention:
                body["prompt_cache_retention"] = retention
            assert client.post("/v1/chat/completions", json=body).status_code == 200
        r = client.post("/v1/chat/completions",
                        json=chat_body(max_tokens=2, prompt_cache_retention="forever"))
        assert r.status_code == 400
    assert [r.persist_kv for r in engine.requests] == [True, False, False]

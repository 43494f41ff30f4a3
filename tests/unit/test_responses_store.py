"""The /v1/responses store (SQLite: tenants, retention) and the routes on a fake engine."""

from __future__ import annotations

from pathlib import Path

from encore.server.response_store import ResponseStore
from tests.unit.server_helpers import api_error, chat_body, serve


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_store_is_tenant_scoped_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    store = ResponseStore(path, retention_s=60, max_rows=10)
    store.put("t1", "resp_1", "resp_1", {"id": "resp_1"}, [{"role": "user", "content": "hi"}])
    assert store.get("t2", "resp_1") is None and store.get(None, "resp_1") is None
    assert not store.delete("t2", "resp_1")
    store.close()
    again = ResponseStore(path, retention_s=60, max_rows=10)
    got = again.get("t1", "resp_1")
    assert got is not None and got.root == "resp_1" and got.conversation[0]["content"] == "hi"
    assert again.delete("t1", "resp_1") and again.get("t1", "resp_1") is None


def test_store_retention_by_age_and_by_count(tmp_path: Path) -> None:
    clock = Clock()
    store = ResponseStore(tmp_path / "r.sqlite3", retention_s=60, max_rows=3, clock=clock)
    for i in range(5):
        clock.now += 1
        store.put(None, f"r{i}", f"r{i}", {}, [])
    assert store.count() == 3 and store.get(None, "r1") is None and store.get(None, "r4")
    clock.now += 61
    assert store.get(None, "r4") is None and store.count() == 0


def test_responses_routes_store_chain_read_delete_and_scope_by_tenant(tmp_path: Path) -> None:
    db = str(tmp_path / "responses.sqlite3")
    with serve(api_keys=["k1", "k2"], responses_db=db) as (client, engine, _):
        h1, h2 = ({"Authorization": f"Bearer {k}"} for k in ("k1", "k2"))
        r = client.post("/v1/responses", json={"input": "hello", "instructions": "be brief",
                                               "max_output_tokens": 8}, headers=h1)
        assert r.status_code == 200, r.text
        first = r.json()
        assert first["object"] == "response" and first["status"] == "incomplete"
        assert first["output"][0]["content"][0]["type"] == "output_text"
        assert first["usage"]["input_tokens_details"]["cached_tokens"] == 0
        assert client.get(f"/v1/responses/{first['id']}", headers=h1).json() == first
        api_error(client.get(f"/v1/responses/{first['id']}", headers=h2), 404)
        api_error(client.post("/v1/responses", json={"input": "x", "previous_response_id":
                                                     first["id"]}, headers=h2), 404,
                  "previous_response_id")
        r = client.post("/v1/responses", json={"input": "and then?", "previous_response_id":
                                               first["id"]}, headers=h1)
        assert r.status_code == 200, r.text
        second = engine.requests[-1]
        assert second.prompt_cache_key == f"response:{first['id']}"  # one program per chain
        assert second.prompt_cache_key == engine.requests[-2].prompt_cache_key
        text = bytes(t for t in second.prompt_token_ids if t < 256).decode()
        assert "be brief" not in text and "hello" in text and "and then?" in text
        api_error(client.delete(f"/v1/responses/{first['id']}", headers=h2), 404)
        assert client.delete(f"/v1/responses/{first['id']}", headers=h1).json()["deleted"]
        api_error(client.get(f"/v1/responses/{first['id']}", headers=h1), 404)
        assert client.post("/v1/chat/completions", json=chat_body(max_tokens=2),
                           headers=h1).status_code == 200


def test_responses_bad_input_is_a_4xx(tmp_path: Path) -> None:
    with serve(responses_db=str(tmp_path / "r.sqlite3")) as (client, _, _):
        api_error(client.post("/v1/responses", json={"input": "x", "previous_response_id":
                                                     "resp_nope"}), 404, "previous_response_id")
        api_error(client.post("/v1/responses", json={"input": "x", "truncation": "auto"}), 400)
        api_error(client.post("/v1/responses", json={"input": "x", "background": True}), 400)
        api_error(client.post("/v1/responses", json={"input": [{"type": "bogus"}]}), 400)
        api_error(client.post("/v1/responses", json={
            "input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}), 400)


def test_caching_fields_combinations_and_cache_write_tokens() -> None:
    with serve(block_size=4) as (client, _, _):
        err = api_error(client.post("/v1/chat/completions", json=chat_body(
            prompt_cache_retention="24h", prompt_cache_options={"ttl": "5m"},
            prompt_cache_key="k")), 400, "prompt_cache_retention")
        assert "prompt_cache_options" in err["message"]
        api_error(client.post("/v1/chat/completions", json=chat_body(
            prompt_cache_options={"mode": "sometimes"})), 400, "prompt_cache_options")
        api_error(client.post("/v1/chat/completions", json=chat_body(
            cache_control={"type": "persistent"})), 400, "cache_control")
        ok = client.post("/v1/chat/completions", json=chat_body(
            max_tokens=2, prompt_cache_key="k", cache_control={"type": "ephemeral", "ttl": "1h"},
            messages=[{"role": "user", "content": [{"type": "text", "text": "a" * 40,
                                                     "cache_control": {"type": "ephemeral"}}]}]))
        assert ok.status_code == 200, ok.text
        details = ok.json()["usage"]["prompt_tokens_details"]
        prompt = ok.json()["usage"]["prompt_tokens"]
        assert details == {"cached_tokens": 0, "cache_write_tokens": prompt // 4 * 4}

"""Chat and text completions against a scripted engine: shapes, streaming, options."""

from __future__ import annotations

from encore.server.sse import parse_sse
from tests.unit.fake_engine_client import EOS, FakeEngineClient, default_script
from tests.unit.server_helpers import chat_body, serve

SCRIPT0 = default_script(None, 0)  # type: ignore[arg-type]


def test_chat_completion_shape_and_usage() -> None:
    with serve() as (client, engine, _):
        r = client.post("/v1/chat/completions", json=chat_body(max_tokens=200))
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "fake-model"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": SCRIPT0}
    assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    n_out = len(SCRIPT0.encode()) + 1  # + eos
    prompt = "<user>hi\n<assistant>"
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": n_out,
                             "total_tokens": len(prompt) + n_out,
                             "prompt_tokens_details": {"cached_tokens": 0,
                                                       "cache_write_tokens": 16}}
    req = engine.requests[0]
    assert req.prompt_token_ids == list(prompt.encode()) and req.eos_token_ids == [EOS]


def test_chat_sampling_fields_reach_the_engine() -> None:
    with serve() as (client, engine, _):
        r = client.post("/v1/chat/completions", json=chat_body(
            max_completion_tokens=5, temperature=0.3, top_p=0.9, seed=7, presence_penalty=0.5,
            frequency_penalty=-0.5, top_k=20, min_p=0.05, repetition_penalty=1.1,
            stop_token_ids=[3], ignore_eos=True, min_tokens=2, priority=-1,
            prompt_cache_key="agent-1", user="u", unknown_field={"x": 1},
            messages=[{"role": "system", "content": "be brief"},
                      {"role": "user", "content": [{"type": "text", "text": "a"},
                                                   {"type": "text", "text": "b"}]}]))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "length"
    req = engine.requests[0]
    sp = req.sampling
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.seed, sp.top_k, sp.min_p) == \
        (5, 0.3, 0.9, 7, 20, 0.05)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (0.5, -0.5, 1.1)
    assert (sp.stop_token_ids, sp.ignore_eos, sp.min_tokens) == ([3], True, 2)
    assert (req.priority, req.prompt_cache_key) == (-1, "agent-1")
    assert bytes(req.prompt_token_ids).decode() == "<system>be brief\n<user>ab\n<assistant>"


def test_chat_streaming_matches_non_streaming_and_ends_with_done() -> None:
    with serve() as (client, _, _):
        full = client.post("/v1/chat/completions", json=chat_body(max_tokens=100)).json()
        r = client.post("/v1/chat/completions", json=chat_body(
            max_tokens=100, stream=True, stream_options={"include_usage": True}))
        assert r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.content)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["total_tokens"] == full["usage"]["total_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 16  # same prompt as before
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_stop_string_truncates_and_aborts() -> None:
    with serve() as (client, engine, _):
        r = client.post("/v1/chat/completions", json=chat_body(stop=["Grüße", "zzz"]))
        body = r.json()
        assert body["choices"][0]["message"]["content"] == "Hello 0! "
        assert body["choices"][0]["finish_reason"] == "stop"
        assert engine.requests[0].request_id in engine.aborted
        s = client.post("/v1/chat/completions", json=chat_body(stop="🌍", stream=True))
        text = "".join(c["choices"][0]["delta"].get("content", "")
                       for c in parse_sse(s.content)[:-1])
    assert text == "Hello 0! Grüße "


def test_n_choices_have_indices() -> None:
    with serve() as (client, _, _):
        body = client.post("/v1/chat/completions", json=chat_body(n=3)).json()
        events = parse_sse(client.post("/v1/chat/completions",
                                       json=chat_body(n=2, stream=True)).content)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["choices"][2]["message"]["content"] == default_script(None, 2)  # type: ignore
    texts = {0: "", 1: ""}
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content", "")
    assert texts == {0: default_script(None, 0), 1: default_script(None, 1)}  # type: ignore


def test_chat_logprobs_shape() -> None:
    with serve() as (client, engine, _):
        body = client.post("/v1/chat/completions", json=chat_body(
            logprobs=True, top_logprobs=2, max_tokens=3)).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == ["H", "e", "l"]
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] == -0.5 for e in content)
    assert content[0]["bytes"] == [72]
    assert engine.requests[0].sampling.logprobs == 2


def test_completions_prompt_forms_and_echo() -> None:
    with serve() as (client, engine, _):
        one = client.post("/v1/completions", json={"model": "fake-model", "prompt": "Say",
                                                   "max_tokens": 5, "echo": True}).json()
        many = client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2,
                                                    "max_tokens": 2}).json()
        ids = client.post("/v1/completions", json={"prompt": [[65, 66], [67]],
                                                   "max_tokens": 1}).json()
    assert one["object"] == "text_completion"
    assert one["choices"][0]["text"] == "SayHello" and one["choices"][0]["finish_reason"] == \
        "length"
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert many["usage"]["prompt_tokens"] == 2 and many["usage"]["completion_tokens"] == 8
    assert [r.prompt_token_ids for r in engine.requests[-2:]] == [[65, 66], [67]]
    assert ids["usage"]["prompt_tokens"] == 3


def test_completions_logprobs_with_echo_use_prompt_logprobs() -> None:
    with serve() as (client, engine, _):
        body = client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2,
                                                    "logprobs": 1, "echo": True}).json()
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "b", "H", "e"]
    assert lp["token_logprobs"] == [None, -2.0, -0.5, -0.5]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][2] == {"H": -0.5}
    assert lp["text_offset"] == [0, 1, 2, 3]
    assert engine.requests[0].sampling.prompt_logprobs == 1


def test_completions_streaming() -> None:
    with serve() as (client, _, _):
        events = parse_sse(client.post("/v1/completions", json={
            "prompt": "x", "max_tokens": 4, "stream": True, "logprobs": 0}).content)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Hell"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "text_completion" for e in events[:-1])


def test_cached_tokens_reported() -> None:
    long = "x" * 100
    with serve() as (client, _, _):
        client.post("/v1/completions", json={"prompt": long, "max_tokens": 1})
        body = client.post("/v1/completions", json={"prompt": long, "max_tokens": 1}).json()
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 96


def test_cache_salt_only_when_allowed() -> None:
    with serve() as (client, _, _):
        r = client.post("/v1/chat/completions", json=chat_body(cache_salt="tenant-a"))
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"
        assert "not supported" in r.json()["error"]["message"]
    with serve(allow_client_cache_salt=True) as (client, engine, _):
        r = client.post("/v1/chat/completions", json=chat_body(cache_salt="tenant-a"))
        assert r.status_code == 200 and engine.requests[0].cache_salt == "tenant-a"


def test_models_and_health() -> None:
    with serve(served_model_name="my-model") as (client, _, _):
        models = client.get("/v1/models").json()
        assert models["data"][0]["id"] == "my-model"
        assert client.get("/health").status_code == 200
        r = client.post("/v1/chat/completions", json=chat_body(model="my-model"))
        assert r.status_code == 200


def test_shutdown_stops_engine() -> None:
    with serve() as (_, engine, _):
        pass
    assert engine.shut_down


async def _asgi_call_until_first_chunk(app, path: str, body: dict,
                                       leave=None) -> list[dict]:
    """Drive the ASGI app by hand: send the body, then disconnect after the first chunk."""
    import asyncio
    import json

    sent: list[dict] = []
    got_chunk = leave or asyncio.Event()
    raw = json.dumps(body).encode()
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await got_chunk.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body") and not leave:
            got_chunk.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent


def test_disconnect_mid_stream_aborts() -> None:
    import asyncio

    from encore.configs.loading import build_config
    from encore.server.app import create_app
    from tests.unit.fake_engine_client import FakeTokenizer

    engine = FakeEngineClient(delay=0.02, script=lambda r, i: "y" * 500)

    async def run() -> None:
        app = create_app(build_config(), engine, tokenizer=FakeTokenizer())
        async with app.router.lifespan_context(app):
            while app.state.ctx.info is None:
                await asyncio.sleep(0.01)
            sent = await _asgi_call_until_first_chunk(
                app, "/v1/chat/completions", chat_body(stream=True, max_tokens=400))
            assert sent[0]["status"] == 200
            assert not engine.active and app.state.ctx.in_flight == 0
            assert engine.requests[0].request_id in engine.aborted
            sent = await _asgi_call_until_first_chunk(
                app, "/v1/completions", {"prompt": ["a", "b"], "stream": True,
                                         "max_tokens": 400})
            assert not engine.active and app.state.ctx.in_flight == 0
            assert {r.request_id for r in engine.requests[1:]} <= set(engine.aborted)
            text = app.state.ctx.metrics.exposition().decode()
            assert 'encore:request_success_total{finished_reason="abort"} 3.0' in text

    asyncio.run(run())


def test_disconnect_while_waiting_for_non_streaming_aborts() -> None:
    import asyncio

    from encore.configs.loading import build_config
    from encore.server.app import create_app
    from tests.unit.fake_engine_client import FakeTokenizer

    engine = FakeEngineClient(delay=0.02, script=lambda r, i: "y" * 500)

    async def run() -> None:
        app = create_app(build_config(), engine, tokenizer=FakeTokenizer())
        async with app.router.lifespan_context(app):
            while app.state.ctx.info is None:
                await asyncio.sleep(0.01)
            leave = asyncio.Event()
            task = asyncio.create_task(_asgi_call_until_first_chunk(
                app, "/v1/chat/completions", chat_body(max_tokens=400), leave))
            await asyncio.sleep(0.2)
            assert engine.active
            leave.set()  # the client goes away: receive() returns http.disconnect
            await asyncio.wait_for(task, timeout=2)
            assert not engine.active and app.state.ctx.in_flight == 0
            assert engine.requests[0].request_id in engine.aborted

    asyncio.run(run())

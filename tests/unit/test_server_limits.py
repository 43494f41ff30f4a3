"""No request starves the others; the API process stays responsive (issue 15, second part).

Some tests run the app behind a real uvicorn server (the one ``encore serve`` configures) on
loopback, since timeouts, connection limits and event-loop stalls only show over sockets.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from encore.configs.loading import build_config
from encore.configs.model_source import default_gguf_path
from encore.server.app import create_app
from encore.server.cli import uvicorn_config
from encore.server.tokenizer import EncoreTokenizer, load_tokenizer
from tests.unit.fake_engine_client import FakeEngineClient, FakeTokenizer
from tests.unit.server_helpers import chat_body, serve


def _err(r: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if param is not None:
        assert err["param"] == param, err
    return err


@contextmanager
def live(engine: FakeEngineClient | None = None, tokenizer: Any = None,
         **overrides: Any) -> Iterator[str]:
    """The app on a FakeEngineClient behind uvicorn as ``encore serve`` builds it; yields the
    base URL once /health is 200."""
    config = build_config(overrides={"port": 0, "log_level": "warning", **overrides})
    app = create_app(config, engine or FakeEngineClient(),
                     tokenizer=tokenizer or FakeTokenizer())
    server = uvicorn.Server(uvicorn_config(config, app))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "never became healthy"
            time.sleep(0.01)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


# ---- sequences count against the queue ---------------------------------------------------------

def test_one_request_with_too_many_sequences_is_400() -> None:
    """64 prompts x n=64 = 4,096 sequences; the queue holds 1,024: refused, others served."""
    with serve() as (client, engine, _):
        r = client.post("/v1/completions", json={"prompt": ["hi"] * 64, "n": 64,
                                                 "max_tokens": 1})
        err = _err(r, 400, "n")
        assert "4096" in err["message"] and "1024" in err["message"], err
        assert "max_waiting_requests" in err["message"]
        assert engine.requests == []
        ok = client.post("/v1/completions", json={"prompt": ["hi"] * 16, "n": 64,
                                                  "max_tokens": 1})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 1024
        assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200
        assert client.get("/health").status_code == 200
    with serve(max_waiting_requests=16) as (client, _, _):
        _err(client.post("/v1/chat/completions", json=chat_body(n=17)), 400, "n")


def test_a_full_queue_is_429_counted_in_sequences() -> None:
    engine = FakeEngineClient(delay=0.02)
    with serve(engine=engine, max_waiting_requests=4, max_num_seqs=2) as (client, _, _):
        body = chat_body(n=4, max_tokens=40, ignore_eos=True, stream=True)
        with client.stream("POST", "/v1/chat/completions", json=body) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            while '"content":"H' not in next(lines):  # wait until it generates: 4 sequences
                pass
            r = client.post("/v1/chat/completions", json=chat_body(n=4))
            err = _err(r, 429)
            assert err["code"] == "queue_full" and r.headers["retry-after"]
            assert client.post("/v1/chat/completions", json=chat_body(n=2)).status_code == 200
            assert client.get("/health").status_code == 200
            assert any("[DONE]" in line for line in lines)  # it finishes, not starved
        assert client.post("/v1/chat/completions", json=chat_body(n=4)).status_code == 200


# ---- big prompts ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol() -> EncoreTokenizer:
    return load_tokenizer(str(default_gguf_path()))


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(smol: EncoreTokenizer) -> None:
    """8 MB of text can never fit 1,024 tokens: 400 at once, not after seconds of BPE."""
    big = "All work and no play makes Jack a dull boy. " * 180_000  # ~8 MB
    engine = FakeEngineClient(max_model_len=1024)
    with live(engine, smol, max_body_bytes=9_000_000) as url, httpx.Client(timeout=60) as http:
        for path, body in [("/v1/completions", {"prompt": big}),
                           ("/v1/completions", {"prompt": ["short", big]}),
                           ("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": big}]})]:
            start = time.monotonic()
            r = http.post(url + path, json=body)
            elapsed = time.monotonic() - start
            err = _err(r, 400)
            assert err["code"] == "context_length_exceeded" and "1024" in err["message"], err
            assert elapsed < 2.0, f"{path}: {elapsed:.1f}s"  # tokenizing it takes ~6 s
        assert http.get(url + "/health").status_code == 200
    assert engine.requests == []


def test_health_stays_fast_while_big_prompts_tokenize(smol: EncoreTokenizer) -> None:
    """Three 2 MB prompts that do fit a (large) context are tokenized off the event loop."""
    engine = FakeEngineClient(max_model_len=10**7, script=lambda req, i: "ok")
    with live(engine, smol, max_body_bytes=9_000_000) as url:
        results: list[int] = []

        def post(i: int) -> None:
            prompt = f"{i} " + "The quick brown fox jumps over the lazy dog. " * 45_000
            r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1},
                           timeout=120)
            results.append(r.status_code)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        worst = 0.0  # longest poll cycle: a stall anywhere in it (even in sleep) shows
        with httpx.Client(timeout=30) as http:
            last = time.monotonic()
            while any(t.is_alive() for t in threads):
                assert http.get(url + "/health").status_code == 200
                time.sleep(0.02)
                now = time.monotonic()
                worst, last = max(worst, now - last), now
        for t in threads:
            t.join()
    assert results == [200, 200, 200]
    assert len(engine.requests) == 3 and len(engine.requests[0].prompt_token_ids) > 400_000
    assert worst < 0.5, f"/health stalled {worst:.2f}s while prompts were tokenized"


# ---- slow and idle clients -----------------------------------------------------------------------

def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the server closes ``sock`` within ``seconds``."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False


def test_slow_headers_are_cut_off_and_others_still_served() -> None:
    with live(header_timeout_s=0.5) as url:
        port = int(url.rsplit(":", 1)[1])
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never finishes
        assert httpx.get(url + "/health").status_code == 200
        start = time.monotonic()
        assert _closed_within(slow, 5.0)
        assert 0.3 < time.monotonic() - start < 3.0
        idle = socket.create_connection(("127.0.0.1", port))  # sends nothing at all
        assert _closed_within(idle, 5.0)
        assert httpx.get(url + "/health").status_code == 200


def test_idle_keep_alive_connections_are_closed() -> None:
    with live(keep_alive_timeout_s=0.5) as url:
        port = int(url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        assert b" 200 " in sock.recv(4096)
        assert _closed_within(sock, 5.0)
        assert httpx.get(url + "/health").status_code == 200


def test_connections_beyond_the_limit_get_503() -> None:
    with live(max_connections=2) as url:
        port = int(url.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        time.sleep(0.2)
        assert httpx.get(url + "/health").status_code == 503
        for s in held:
            s.close()
        time.sleep(0.2)
        assert httpx.get(url + "/health").status_code == 200

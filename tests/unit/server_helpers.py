"""Shared helpers for the server route tests: an app on a FakeEngineClient, ready to serve."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

from fastapi.testclient import TestClient

from encore.configs.loading import build_config
from encore.server.app import create_app
from tests.unit.fake_engine_client import FakeEngineClient, FakeTokenizer


@contextmanager
def serve(engine: FakeEngineClient | None = None, wait_ready: bool = True, **overrides: Any):
    """Yield (client, engine, app) with the app started and (by default) ready."""
    engine = engine or FakeEngineClient()
    config = build_config(overrides=overrides)
    app = create_app(config, engine, tokenizer=FakeTokenizer())
    with TestClient(app, raise_server_exceptions=False) as client:
        if wait_ready:
            deadline = time.monotonic() + 5
            while client.get("/health").status_code != 200:
                assert time.monotonic() < deadline, "fake engine never became ready"
                time.sleep(0.01)
        yield client, engine, app


def chat_body(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "fake-model",
                            "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return body


def api_error(r: Any, status: int, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object of response ``r``, checked: status, the four fields, param."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    return err

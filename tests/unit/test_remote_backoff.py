"""The remote tier's up/down state: the backoff doubles once per failed attempt."""

from __future__ import annotations

import redis

from encore.worker.tiers import remote_io
from encore.worker.tiers.frames import Frames
from encore.worker.tiers.remote_io import RemoteError, RemoteStore


def _store() -> RemoteStore:  # no connection is made until an op runs
    return RemoteStore("redis://127.0.0.1:1/0", "encore:kv:test", Frames(b"f" * 32, 64, b"k" * 32),
                       ttl_s=60, max_value_bytes=1 << 20, timeout_s=0.1)


def _refused():
    raise redis.exceptions.ConnectionError("refused")


def _fail(store: RemoteStore) -> str:
    try:
        store._call(_refused)
    except RemoteError as e:
        return e.kind
    raise AssertionError("the op did not fail")


def test_ops_in_flight_when_the_store_goes_away_count_as_one_attempt(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(remote_io.time, "monotonic", lambda: now[0])
    store = _store()
    assert _fail(store) == "down" and not store.up
    for _ in range(5):  # other I/O threads' ops of the same moment fail too
        store._went_down(ConnectionError("refused"))
    assert store._retry_at == 101.0  # still the first wait, 1 s
    assert _fail(store) == "down"  # within the wait: refused at once, the wait unchanged
    assert store._retry_at == 101.0
    now[0] = 101.5  # the next attempt fails: the wait doubles, once
    assert _fail(store) == "down"
    assert store._retry_at == 103.5
    now[0] = 104.0

    def ok():
        return b"pong"

    assert store._call(ok) == b"pong" and store.up and store._failures == 0

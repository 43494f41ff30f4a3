"""Two real Encore replicas sharing one real redis-server (the remote KV tier) and one
deployment secret: what one computed, the other loads; tenants stay apart; a store that dies
is a miss, never an error; a corrupted value is caught."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.e2e_server import API_KEY, Server, free_port, start_server, stop_server
from tests.e2e.redis_server import Store, start_store, stop_store

pytestmark = pytest.mark.slow

OTHER_KEY = "e2e-fleet-other-tenant"
WORDS = ["anchor", "bramble", "cinder", "dahlia", "ember", "fjord", "gossamer", "heron",
         "indigo", "juniper", "kestrel", "lagoon"]


def prompt(i: int, words: int = 200) -> str:
    return f"Dossier {i}: " + " ".join(WORDS[(i * 3 + j * (i + 5)) % len(WORDS)]
                                       for j in range(words))


def complete(server: Server, text: str, key: str = API_KEY) -> tuple[str, int]:
    c = openai.OpenAI(base_url=server.v1, api_key=key, max_retries=0, timeout=120)
    r = c.completions.create(model=c.models.list().data[0].id, prompt=text, max_tokens=6,
                             temperature=0)
    details = r.usage.prompt_tokens_details
    return r.choices[0].text, (details.cached_tokens or 0) if details else 0


def metric(server: Server, name: str, labels: str = "") -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def remote_view(server: Server) -> str:
    """What decides a remote load, for a failure's message: the store's state, its errors,
    and the load policy's estimates (a load must beat recomputing)."""
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    return "\n".join(line for line in text.splitlines() if not line.startswith("#") and (
        "remote" in line or "prefill_tokens_per_second" in line or "bandwidth" in line))


REMOTE_SENT = ("encore:kv_tier_transfer_bytes_total", 'dst="remote",src="device"')


def settle(server: Server, since: float = 0.0) -> None:
    """Wait until the replica's writes to the store have stopped (it checkpoints when idle);
    with ``since`` (its bytes sent before a request of new blocks), until they have also
    gone past it: the checkpoint of that request may not have begun yet."""
    last, deadline = -1.0, time.monotonic() + 60
    while time.monotonic() < deadline:
        now = metric(server, *REMOTE_SENT)
        if now == last and now > since:
            return
        last = now
        time.sleep(0.5)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server, Store]]:
    tmp = tmp_path_factory.mktemp("fleet")
    store = start_store(tmp / "store")
    secret = tmp / "fleet.secret"
    secret.write_text("one secret for the whole fleet\n")
    args = ["--remote-cache-url", store.url, "--deployment-secret-file", str(secret),
            "--api-key", OTHER_KEY]
    a = start_server(tmp, *args)
    b = start_server(tmp, *args)
    yield a, b, store
    stop_server(a)
    stop_server(b)
    stop_store(store)


def test_what_one_replica_computed_the_other_loads(fleet) -> None:
    a, b, store = fleet
    sent = metric(a, *REMOTE_SENT)
    cold, cached = complete(a, prompt(0))
    assert cached == 0
    settle(a, sent)
    assert store.client().dbsize() > 0
    text, cached = complete(b, prompt(0))
    assert text == cold, "the same greedy output as the cold run"
    assert cached >= 160
    assert metric(b, "encore:kv_tier_hit_tokens_total", 'tier="remote"') >= cached


def test_tenants_stay_apart_across_replicas(fleet) -> None:
    a, b, _ = fleet
    sent = metric(a, *REMOTE_SENT)
    text, _ = complete(a, prompt(1))
    settle(a, sent)
    other, cached = complete(b, prompt(1), key=OTHER_KEY)
    assert cached == 0, "another tenant never reuses this tenant's blocks"
    assert other == text


@contextmanager
def kept_busy(server: Server) -> Iterator[list[int]]:
    """Long requests back to back on ``server`` (its engine never idles for a second) until
    the block ends; yields the count of those finished."""
    stop, done = threading.Event(), [0]

    def run() -> None:
        c = openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=120)
        model = c.models.list().data[0].id
        while not stop.is_set():
            c.completions.create(model=model, prompt="Count from one:", max_tokens=120,
                                 temperature=0)
            done[0] += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join(timeout=120)


def test_a_dead_store_is_a_miss_and_hits_resume_after_it_restarts(fleet, tmp_path) -> None:
    a, b, store = fleet
    stop_store(store)
    for i, replica in enumerate((a, b, a, b)):  # both keep answering: no 5xx, no errors
        text, cached = complete(replica, prompt(10 + i))
        assert text and cached == 0
    assert httpx.get(a.base_url + "/health").status_code == 200
    assert metric(a, "encore:kv_remote_up") == 0.0
    assert metric(a, "encore:kv_remote_errors_total", 'kind="down"') >= 1
    restarted = start_store(store.dir, port=store.port)
    store.proc = restarted.proc
    time.sleep(2.5)  # past the probe retry interval and the worker's first backoff
    complete(a, prompt(20))  # the store answers again: written on the next checkpoint
    settle(a)
    with kept_busy(b) as finished:  # b steps all along: it must still probe the store again
        text, cached = complete(b, prompt(20))
        deadline, n = time.monotonic() + 40, 21
        while cached == 0 and time.monotonic() < deadline:  # b's store backoff may still run
            time.sleep(2)
            sent = metric(a, *REMOTE_SENT)
            complete(a, prompt(n))  # a fresh prompt each time: a hit on b comes from the
            settle(a, sent)  # store, not from b's own cache of an earlier try
            text, cached = complete(b, prompt(n))
            n += 1
    assert finished[0] >= 1, "b was kept busy"
    assert cached > 0, f"no remote hit on b; its view:\n{remote_view(b)}"
    # the gauge follows the worker's reports, which ride on step outputs: keep b stepping
    deadline = time.monotonic() + 10
    while metric(b, "encore:kv_remote_up") != 1.0 and time.monotonic() < deadline:
        complete(b, prompt(n))
        n += 1
        time.sleep(0.5)
    assert metric(b, "encore:kv_remote_up") == 1.0


def wait_remote_up(server: Server, i: int) -> None:
    """Traffic until ``server`` finds the store up again: after an outage its worker retries
    with a backoff that doubles with each attempt that fails (up to 30 s)."""
    deadline = time.monotonic() + 45
    complete(server, prompt(i))
    while metric(server, "encore:kv_remote_up") != 1.0 and time.monotonic() < deadline:
        time.sleep(2)
        complete(server, prompt(i))


def test_a_corrupted_value_is_detected_not_served_and_counted(fleet) -> None:
    a, b, store = fleet
    wait_remote_up(a, 29)  # the dead-store test before may have left it backing off
    sent = metric(a, *REMOTE_SENT)
    cold, _ = complete(a, prompt(30))
    settle(a, sent)
    r = store.client()
    before = set(r.keys("encore:kv:*"))
    sent = metric(a, *REMOTE_SENT)
    complete(a, prompt(31))
    settle(a, sent)  # a flake in CI (2026-12-07): settled on prompt 30's count, no new keys
    keys = sorted(set(r.keys("encore:kv:*")) - before)
    assert keys
    for key in keys:  # forge every block of prompt 31: same header, other bytes
        value = bytearray(r.get(key))
        value[200:260] = bytes(60)
        r.set(key, bytes(value))
    reference, _ = complete(a, prompt(31))
    text, cached = complete(b, prompt(31))
    assert text == reference and cached == 0
    assert metric(b, "encore:kv_remote_errors_total", 'kind="corrupt"') >= 1


def start_router(tmp: Path, workers: list[str]) -> tuple[subprocess.Popen, str]:
    """vllm-router (from the dev extra) in front of ``workers``: a conversation's X-Session-ID
    sticks to the replica it was first given (the least loaded), quick health checks
    (docs/operations.md, "A fleet")."""
    binary = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
    port, metrics_port = free_port(), free_port()
    cmd = [binary, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers,
           "--policy", "sticky_least_loaded", "--worker-startup-check-interval", "1",
           "--health-check-interval-secs", "2", "--health-check-timeout-secs", "2",
           "--health-failure-threshold", "2", "--health-success-threshold", "1",
           "--cb-failure-threshold", "2", "--cb-timeout-duration-secs", "10",
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    log = (tmp / "router.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"the router did not start:\n{(tmp / 'router.log').read_text()[-2000:]}")


def served(server: Server) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(r"^encore:request_success_total\{[^}]*\} (\S+)$",
                                            text, re.M))


def test_the_router_keeps_each_conversation_on_one_replica(fleet, tmp_path) -> None:
    """Through the router, with the official client: every turn of a conversation reaches
    the same replica (its X-Session-ID), conversations spread over both, and each turn
    reuses the previous one's KV."""
    a, b, _ = fleet
    proc, base = start_router(tmp_path, [a.base_url, b.base_url])
    try:
        placed: dict[str, str] = {}
        for conv in range(6):
            client = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0,
                                   timeout=120,
                                   default_headers={"X-Session-ID": f"conversation-{conv}"})
            history = prompt(40 + conv, words=120)
            for turn in range(3):
                before = (served(a), served(b))
                r = client.completions.create(model=client.models.list().data[0].id,
                                              prompt=history, max_tokens=4, temperature=0)
                after = (served(a), served(b))
                replica = "a" if after[0] > before[0] else "b"
                assert placed.setdefault(f"conversation-{conv}", replica) == replica
                cached = r.usage.prompt_tokens_details.cached_tokens or 0
                assert turn == 0 or cached >= 100, (conv, turn, cached)
                history += r.choices[0].text + f" Turn {turn}: more words please."
        assert set(placed.values()) == {"a", "b"}, placed
    finally:
        proc.terminate()
        proc.wait(timeout=30)

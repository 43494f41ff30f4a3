"""A real server with ``--tensor-parallel-size 2`` (two gloo worker processes): it answers
through the official openai client; killing one rank while idle makes ``/health`` 503 until
the group is back, and then it answers again."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.e2e_server import API_KEY, start_server, stop_server
from tests.helpers.tiny_models import make_tiny_model_dir

pytestmark = pytest.mark.slow


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1]
                                              .split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def rank_pid(server_pid: int, rank: int) -> int:
    for pid in descendants(server_pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"encore.worker.main" in args and b"--rank" in args \
                and args[args.index(b"--rank") + 1] == str(rank).encode():
            return pid
    raise AssertionError(f"no rank {rank} under {server_pid}")


def wait_health(server, status: int, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if httpx.get(server.base_url + "/health", timeout=2).status_code == status:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"/health never answered {status}:\n{server.log_tail()}")


def test_two_rank_server_answers_and_survives_a_dead_rank(tmp_path):
    model = make_tiny_model_dir(tmp_path / "tiny", "llama", seed=5)
    server = start_server(tmp_path, "--model", str(model), "--tensor-parallel-size", "2",
                          "--dtype", "float32")
    try:
        client = openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0)

        def ask() -> str:
            r = client.chat.completions.create(
                model=client.models.list().data[0].id, max_tokens=8, temperature=0,
                messages=[{"role": "user", "content": "hello there"}])
            assert r.usage is not None and r.usage.completion_tokens == 8
            return r.choices[0].message.content or ""

        before = ask()
        old = rank_pid(server.proc.pid, 1)
        os.kill(old, signal.SIGKILL)
        assert wait_health(server, 503, timeout=10) < 10
        wait_health(server, 200, timeout=120)
        assert rank_pid(server.proc.pid, 1) != old
        assert ask() == before  # the same model, split the same way
    finally:
        assert stop_server(server) == 0

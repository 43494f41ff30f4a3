"""The KV cache survives restarts with the flags a user gets by default plus a disk directory
(write-back, no host tier): graceful stops by SIGTERM or SIGINT, to the server or to its whole
process group, and ``kill -9`` of the group after a checkpoint.

Each server here leads its own process group, as a server started from a shell does.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import openai
import pytest

from tests.e2e.e2e_server import API_KEY, Server, start_server

pytestmark = pytest.mark.slow

WORDS = ["river", "copper", "lantern", "orchid", "basalt", "quiver", "summit", "tannin",
         "walnut", "zephyr", "marble", "fennel", "glacier", "hazel"]


def document(i: int, words: int = 260) -> str:
    return f"Ledger {i}. " + " ".join(WORDS[(i * 7 + j * (i + 3)) % len(WORDS)]
                                      for j in range(words))


def complete(server: Server, prompt: str) -> tuple[str, int, int]:
    """(text, prompt tokens, cached tokens) of a greedy completion."""
    c = openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=300)
    r = c.completions.create(model=c.models.list().data[0].id, prompt=prompt, max_tokens=4,
                             temperature=0)
    details = r.usage.prompt_tokens_details
    return r.choices[0].text, r.usage.prompt_tokens, (details.cached_tokens or 0) if details else 0


def serve(tmp: Path, disk: Path, *extra: str) -> Server:
    return start_server(tmp, "--disk-cache-dir", str(disk), *extra, preset=None, own_group=True)


def stop(server: Server, sig: signal.Signals, group: bool) -> int:
    """Send ``sig`` to the server or its whole group; its exit code."""
    if group:
        os.killpg(server.proc.pid, sig)
    else:
        server.proc.send_signal(sig)
    return server.proc.wait(timeout=120)


def model_loads(server: Server) -> int:
    """How many times a worker loaded the model (once per life unless something restarted)."""
    return server.log_path.read_text(errors="replace").count("worker ready:")


def check_and_add(server: Server, kept: dict[str, str], new: str) -> None:
    """Every prompt of an earlier life comes back >= 90% cached with the same output; then
    ``new`` is served cold (and kept for the next life)."""
    for prompt, text in kept.items():
        again, prompt_tokens, cached = complete(server, prompt)
        assert again == text
        assert cached >= 0.9 * prompt_tokens, (cached, prompt_tokens, server.log_tail())
    text, _, cached = complete(server, new)
    assert cached == 0
    kept[new] = text


def assert_clean_stop(server: Server, code: int) -> None:
    assert code == 0, server.log_tail()
    assert model_loads(server) == 1, "nothing was restarted during the shutdown"
    log = server.log_path.read_text(errors="replace")
    assert "engine process exited" not in log and "restarting the model worker" not in log


def test_the_cache_survives_graceful_stops_and_kill_9(tmp_path: Path) -> None:
    """Five lives on one disk directory, each ended differently: SIGTERM to the server,
    SIGINT to its group (Ctrl-C), SIGTERM to its group, then kill -9 of the group after a
    checkpoint interval. Each life finds every earlier prompt cached."""
    disk = tmp_path / "kv"
    kept: dict[str, str] = {}
    endings = [(signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGTERM, True)]
    for life, (sig, group) in enumerate(endings):
        srv = serve(tmp_path, disk)
        try:
            check_and_add(srv, kept, document(life))
        finally:
            code = stop(srv, sig, group)
        assert_clean_stop(srv, code)
    srv = serve(tmp_path, disk, "--checkpoint-interval-s", "1")
    try:
        check_and_add(srv, kept, document(9))
        time.sleep(3)  # one checkpoint interval, and then some
    finally:
        os.killpg(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait(timeout=30)
    srv = serve(tmp_path, disk)
    try:
        check_and_add(srv, kept, document(10))
    finally:
        assert stop(srv, signal.SIGTERM, group=True) == 0

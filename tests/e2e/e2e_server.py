"""Start and stop a real Encore server (``python -m encore.server.cli serve``) on loopback.

The server runs the embedded SmolLM2 GGUF on the CPU with the ``test`` preset (small KV pool,
small batches) and an API key. Its log goes to a file that is printed if start-up fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
API_KEY = "e2e-secret"
START_TIMEOUT_S = float(os.environ.get("ENCORE_E2E_START_TIMEOUT", "240"))


@dataclass
class Server:
    proc: subprocess.Popen
    base_url: str
    log_path: Path

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path, *extra: str, preset: str | None = "test",
                 own_group: bool = False) -> Server:
    """``preset=None``: the defaults a user gets; ``own_group``: the server leads a new
    process group (signals to the group reach it and its children, not pytest)."""
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    cmd = [sys.executable, "-m", "encore.server.cli", "serve",
           *(["--config", preset] if preset else []), "--host", "127.0.0.1",
           "--port", str(port), "--api-key", API_KEY, "--max-body-bytes", "262144",
           "--responses-db", str(tmp / f"responses-{port}.sqlite3"), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": ""}
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=own_group)
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    pytest.fail(f"server not healthy after {START_TIMEOUT_S}s:\n{server.log_tail()}")


def stop_server(server: Server, timeout: float = 30) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode


def metric(server: Server, name: str) -> float:
    """The value of the unlabelled series ``name`` on the server's /metrics."""
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[-1])

"""A real ``redis-server`` (or ``valkey-server``) on a free loopback port, with its own
directory and no persistence, for the remote KV tier's tests (``.ci/run`` installs Debian's
``redis-server`` when it is missing)."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.e2e.e2e_server import free_port


@dataclass
class Store:
    proc: subprocess.Popen
    port: int
    dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


def server_binary() -> str:
    binary = shutil.which("valkey-server") or shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run "
                    "installs it)")
    return binary


def start_store(tmp: Path, port: int | None = None) -> Store:
    port = port or free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
           "--appendonly", "no", "--dir", str(tmp), "--maxmemory", "256mb",
           "--maxmemory-policy", "allkeys-lru"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    store = Store(proc, port, tmp)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if store.client().ping():
                return store
        except redis.exceptions.ConnectionError:
            time.sleep(0.1)
    stop_store(store)
    pytest.fail("redis-server did not start")


def stop_store(store: Store) -> None:
    if store.proc.poll() is None:
        store.proc.terminate()
        store.proc.wait(timeout=20)

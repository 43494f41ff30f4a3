"""Starting a child process (P1 from P0, P2 from P1) wired to a ZMQ socket pair.

The parent binds a PUSH (to the child) and a PULL (from the child) socket on ``ipc://``
addresses inside one private temp directory, starts ``python -m MODULE --in ADDR --out ADDR``,
and the child connects. The child's first message is its readiness answer (``WorkerReady`` /
``EngineReady``, or ``EngineDead`` with the reason); the callers wait for it with a deadline.
The directory is removed when the parent closes the pair (:meth:`Child.close`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import msgspec
import zmq

from encore.configs import EncoreConfig


@dataclass
class Child:
    """A started child process and the parent's ends of its socket pair."""

    proc: subprocess.Popen
    to_child: zmq.Socket
    from_child: zmq.Socket
    ipc_dir: str

    def close(self) -> None:
        """Close both sockets and remove the ipc directory (the process is not touched)."""
        self.to_child.close(linger=0)
        self.from_child.close(linger=0)
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


def spawn_child(ctx: zmq.Context, module: str, config: EncoreConfig, *extra_args: str) -> Child:
    """Start ``python -m module`` wired to a fresh PUSH (to it) / PULL (from it) socket pair.

    The child reads the config as JSON from its stdin (``read_config``), never from its
    command line, where any user of the machine could read its API keys. Works with sync or
    asyncio contexts.
    """
    ipc_dir = tempfile.mkdtemp(prefix="encore-")
    to_child, from_child = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    out_addr, in_addr = f"ipc://{ipc_dir}/to-child", f"ipc://{ipc_dir}/from-child"
    to_child.bind(out_addr)
    from_child.bind(in_addr)
    cmd = [sys.executable, "-m", module, "--in", out_addr, "--out", in_addr, *extra_args]
    proc = subprocess.Popen(cmd, env=os.environ.copy(), stdin=subprocess.PIPE)
    assert proc.stdin is not None
    with proc.stdin:
        proc.stdin.write(msgspec.json.encode(config))
    return Child(proc, to_child, from_child, ipc_dir)


def read_config() -> EncoreConfig:
    """In a child: the config its parent wrote to our stdin (``spawn_child``)."""
    return msgspec.json.decode(sys.stdin.buffer.read(), type=EncoreConfig)

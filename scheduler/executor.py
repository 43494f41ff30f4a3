"""Executors: how the engine (P1) runs a step on the worker.

``Executor`` is the seam between the scheduler and the model: the engine hands it a
``SchedulerOutput`` and gets a ``ModelRunnerOutput`` back. ``MPExecutor`` runs the worker as
a child process (``python -m worker.main``) over ZMQ + msgpack; an in-process executor lives
in ``worker.executor`` (tests, offline use). The scheduler never imports the worker.
"""

from __future__ import annotations

import abc
import logging
import os
import subprocess
import sys
import tempfile
import time

import msgspec
import zmq

from configs import EncoreConfig
from scheduler.protocol import (
    EngineDead,
    ModelRunnerOutput,
    SchedulerOutput,
    Shutdown,
    WorkerReady,
    decode,
    encode,
)

logger = logging.getLogger(__name__)

POLL_MS = 100  # how often a waiting executor checks that the worker is still alive


class WorkerDiedError(RuntimeError):
    """The worker process exited or failed; in-flight requests cannot complete."""


class Executor(abc.ABC):
    @abc.abstractmethod
    def start(self) -> WorkerReady:
        """Load the model (blocking); raise WorkerDiedError if the worker cannot start."""

    @abc.abstractmethod
    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step; raise WorkerDiedError if the worker is gone."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the worker; idempotent."""


def ipc_address(tag: str) -> str:
    """A fresh ``ipc://`` address in a private temp directory."""
    return f"ipc://{tempfile.mkdtemp(prefix='encore-')}/{tag}"


def spawn_child(ctx: zmq.Context, module: str, config: EncoreConfig, *extra_args: str
                ) -> tuple[subprocess.Popen, zmq.Socket, zmq.Socket]:
    """Start ``python -m module`` wired to a fresh PUSH (to it) / PULL (from it) socket pair.

    The sockets are bound here on private ``ipc://`` addresses; the child connects to them
    (``--in`` / ``--out``) and gets the config as JSON. Works with sync or asyncio contexts.
    """
    to_child, from_child = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    out_addr, in_addr = ipc_address("to-child"), ipc_address("from-child")
    to_child.bind(out_addr)
    from_child.bind(in_addr)
    cmd = [sys.executable, "-m", module, "--in", out_addr, "--out", in_addr, *extra_args,
           "--config-json", msgspec.json.encode(config).decode()]
    return subprocess.Popen(cmd, env=os.environ.copy()), to_child, from_child


class MPExecutor(Executor):
    """The worker as a child process; notices its death within ``POLL_MS``."""

    def __init__(self, config: EncoreConfig) -> None:
        self.config = config
        self.ctx: zmq.Context = zmq.Context.instance()
        self.proc: subprocess.Popen | None = None
        self.to_worker: zmq.Socket | None = None
        self.from_worker: zmq.Socket | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> WorkerReady:
        self.shutdown()
        self.proc, self.to_worker, self.from_worker = spawn_child(self.ctx, "worker.main",
                                                                  self.config)
        msg = self._recv(timeout_s=self.config.worker.start_timeout_s)
        if isinstance(msg, EngineDead):
            self.shutdown()
            raise WorkerDiedError(msg.reason)
        if not isinstance(msg, WorkerReady):
            raise WorkerDiedError(f"unexpected worker handshake {type(msg).__name__}")
        return msg

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        if self.to_worker is None or self.proc is None:
            raise WorkerDiedError("worker is not running")
        self.to_worker.send(encode(step), copy=False)
        msg = self._recv(timeout_s=None)
        if not isinstance(msg, ModelRunnerOutput):
            raise WorkerDiedError(f"unexpected worker message {type(msg).__name__}")
        if msg.error:
            raise WorkerDiedError(f"worker failed a step: {msg.error}")
        return msg

    def _recv(self, timeout_s: float | None):
        assert self.from_worker is not None and self.proc is not None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.from_worker.poll(POLL_MS):
            code = self.proc.poll()
            if code is not None:
                raise WorkerDiedError(f"worker process exited with code {code}")
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerDiedError(f"worker did not start within {timeout_s:.0f}s")
        return decode(self.from_worker.recv(copy=False).buffer)

    def shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.to_worker is not None:
            try:
                self.to_worker.send(encode(Shutdown()), flags=zmq.NOBLOCK)
                self.proc.wait(timeout=5)
            except (zmq.ZMQError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for sock in (self.to_worker, self.from_worker):
            if sock is not None:
                sock.close(linger=0)
        self.proc = self.to_worker = self.from_worker = None

"""Executors: how the engine (P1) runs a step on the worker (P2).

``Executor`` is the seam between the scheduler and the model: the engine hands it a
``SchedulerOutput`` and gets a ``ModelRunnerOutput`` back. ``MPExecutor`` runs the worker as
a child process (``python -m encore.worker.main``) over ZMQ + msgpack; an in-process executor
lives in ``encore.worker.executor`` (tests, offline use). The scheduler never imports the worker.
"""

from __future__ import annotations

import abc
import logging
import subprocess
import time

import zmq

from encore.configs import EncoreConfig
from encore.protocol.messages import (
    EngineDead,
    ModelRunnerOutput,
    SchedulerOutput,
    Shutdown,
    WorkerReady,
    decode,
    encode,
)
from encore.protocol.spawn import Child, spawn_child

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


class MPExecutor(Executor):
    """The worker as a child process; notices its death within ``POLL_MS``."""

    def __init__(self, config: EncoreConfig) -> None:
        self.config = config
        self.ctx: zmq.Context = zmq.Context.instance()
        self.child: Child | None = None

    @property
    def pid(self) -> int | None:
        return self.child.proc.pid if self.child else None

    def start(self) -> WorkerReady:
        self.shutdown()
        self.child = spawn_child(self.ctx, "encore.worker.main", self.config)
        msg = self._recv(timeout_s=self.config.worker.start_timeout_s)
        if isinstance(msg, EngineDead):
            self.shutdown()
            raise WorkerDiedError(msg.reason)
        if not isinstance(msg, WorkerReady):
            raise WorkerDiedError(f"unexpected worker handshake {type(msg).__name__}")
        return msg

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        if self.child is None:
            raise WorkerDiedError("worker is not running")
        self.child.to_child.send(encode(step), copy=False)
        msg = self._recv(timeout_s=None)
        if not isinstance(msg, ModelRunnerOutput):
            raise WorkerDiedError(f"unexpected worker message {type(msg).__name__}")
        if msg.error:
            raise WorkerDiedError(f"worker failed a step: {msg.error}")
        return msg

    def _recv(self, timeout_s: float | None):
        assert self.child is not None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.child.from_child.poll(POLL_MS):
            code = self.child.proc.poll()
            if code is not None:
                raise WorkerDiedError(f"worker process exited with code {code}")
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerDiedError(f"worker did not start within {timeout_s:.0f}s")
        return decode(self.child.from_child.recv(copy=False).buffer)

    def shutdown(self) -> None:
        child, self.child = self.child, None
        if child is None:
            return
        if child.proc.poll() is None:
            try:
                child.to_child.send(encode(Shutdown()), flags=zmq.NOBLOCK)
                child.proc.wait(timeout=5)
            except (zmq.ZMQError, subprocess.TimeoutExpired):
                child.proc.kill()
                child.proc.wait()
        child.close()

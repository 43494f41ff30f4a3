"""Executors: how the engine (P1) runs a step on the worker (P2).

``Executor`` is the seam between the scheduler and the model: the engine hands it a
``SchedulerOutput`` and gets a ``ModelRunnerOutput`` back. ``MPExecutor`` runs the worker as
a child process (``python -m encore.worker.main``) over ZMQ + msgpack; an in-process executor
lives in ``encore.worker.executor`` (tests, offline use). The scheduler never imports the worker.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from encore.configs import EncoreConfig
from encore.protocol.messages import (
    Drain,
    EngineDead,
    GrammarBitmask,
    GrammarMasks,
    KVDone,
    KVProbed,
    ModelRunnerOutput,
    SchedulerOutput,
    Shutdown,
    WorkerReady,
    decode,
    encode,
)
from encore.protocol.spawn import Child, spawn_child

logger = logging.getLogger(__name__)

MaskSource = Callable[[], "GrammarBitmask | None"]
POLL_MS = 100  # how often a waiting executor checks that the worker is still alive


class WorkerDiedError(RuntimeError):
    """The worker process exited or failed; in-flight requests cannot complete."""


class Executor(abc.ABC):
    @abc.abstractmethod
    def start(self) -> WorkerReady:
        """Load the model (blocking); raise WorkerDiedError if the worker cannot start."""

    @abc.abstractmethod
    def submit(self, step: SchedulerOutput, masks: MaskSource | None = None) -> None:
        """Hand one step to the worker; raise WorkerDiedError if it is gone. ``masks`` (with
        ``step.grammar_follows``): builds the step's token masks; called once the step is on
        its way, so that they are built while the forward pass runs."""

    @abc.abstractmethod
    def collect(self, drain: bool = False) -> ModelRunnerOutput:
        """The output of the oldest submitted step not yet collected, in submission order.
        A step with ``defer_output`` is answered once the next step is launched; ``drain``
        asks for it now (no next step follows)."""

    def execute(self, step: SchedulerOutput, masks: MaskSource | None = None
                ) -> ModelRunnerOutput:
        """Run one step and wait for its output."""
        self.submit(step, masks)
        return self.collect(drain=step.defer_output)

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the worker; idempotent."""

    def alive(self) -> bool:
        """False once the worker (any of its processes) has exited."""
        return True


class MPExecutor(Executor):
    """The worker as child processes, one per tensor-parallel rank
    (``worker.tensor_parallel_size``; one process without it); notices a death within
    ``POLL_MS``. Each step is encoded once and the same bytes go to every rank; rank 0's
    answer carries the sampled tokens, and ``RankMerge`` folds the ranks' tier reports into
    one. A rank that dies or fails is the whole worker's death: every rank is stopped and
    ``start`` brings up a fresh group."""

    def __init__(self, config: EncoreConfig) -> None:
        self.config = config
        self.size = config.worker.tensor_parallel_size
        self.ctx: zmq.Context = zmq.Context.instance()
        self.children: list[Child] = []
        self.rendezvous: str | None = None
        self.merge = RankMerge(self.size)

    @property
    def pid(self) -> int | None:
        return self.children[0].proc.pid if self.children else None

    @property
    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children]

    def alive(self) -> bool:
        return bool(self.children) and all(c.proc.poll() is None for c in self.children)

    def start(self) -> WorkerReady:
        self.shutdown()
        self.merge = RankMerge(self.size)
        args: list[list[str]] = [[]]
        if self.size > 1:
            self.rendezvous = tempfile.mkdtemp(prefix="encore-tp-")
            init = f"file://{self.rendezvous}/rendezvous"
            args = [["--rank", str(r), "--tp-size", str(self.size), "--dist-init", init]
                    for r in range(self.size)]
        self.children = [spawn_child(self.ctx, "encore.worker.main", self.config, *a)
                         for a in args]
        try:
            msgs = self._recv_all(timeout_s=self.config.worker.start_timeout_s)
            for msg in msgs:
                if not isinstance(msg, WorkerReady):
                    raise WorkerDiedError(f"unexpected worker handshake {type(msg).__name__}")
        except WorkerDiedError:
            self.shutdown()
            raise
        return self.merge.ready(msgs)

    def submit(self, step: SchedulerOutput, masks: MaskSource | None = None) -> None:
        self._send_all(encode(step))
        if step.grammar_follows:  # only rank 0 samples
            grammar = masks() if masks is not None else None
            self._send(0, encode(GrammarMasks(step.step_id, grammar)))

    def _send_all(self, frame: bytes) -> None:
        if not self.children:
            raise WorkerDiedError("worker is not running")
        for rank in range(len(self.children)):
            self._send(rank, frame)

    def collect(self, drain: bool = False) -> ModelRunnerOutput:
        if drain:
            self._send_all(encode(Drain()))
        if not self.children:
            raise WorkerDiedError("worker is not running")
        msgs = self._recv_all(timeout_s=None)
        errors = []
        for rank, msg in enumerate(msgs):
            if not isinstance(msg, ModelRunnerOutput):
                raise WorkerDiedError(f"unexpected worker message {type(msg).__name__}")
            if msg.error:
                errors.append(msg.error if self.size == 1 else f"rank {rank}: {msg.error}")
        if errors:
            raise WorkerDiedError(f"worker failed a step: {'; '.join(errors)}")
        return self.merge.step(msgs)

    def _recv_all(self, timeout_s: float | None) -> list[object]:
        """One message from every rank, in rank order. WorkerDiedError as soon as a rank
        says it is dead or any rank has exited (the others may be waiting for it inside a
        collective), with the dead rank's reason when it sent one."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        msgs: list[object] = [None] * len(self.children)
        waiting = set(range(len(self.children)))
        poller = zmq.Poller()
        for child in self.children:
            poller.register(child.from_child, zmq.POLLIN)
        while waiting:
            ready = dict(poller.poll(POLL_MS))
            for rank in sorted(waiting):
                if self.children[rank].from_child in ready:
                    msgs[rank] = self._take(rank)
                    waiting.discard(rank)
            for rank, child in enumerate(self.children):
                code = child.proc.poll()
                if code is not None and (rank in waiting or self.size > 1):
                    if rank in waiting and child.from_child.poll(0):
                        self._take(rank)  # raises with its reason if it sent one
                    raise WorkerDiedError(f"{self._who(rank)} exited with code {code}")
            if waiting and deadline is not None and time.monotonic() > deadline:
                raise WorkerDiedError(f"worker did not start within {timeout_s:.0f}s")
        return msgs

    def _send(self, rank: int, frame: bytes) -> None:
        """Hand ``frame`` to a rank; WorkerDiedError if it has exited (a PUSH socket whose
        only peer is gone would block the engine forever)."""
        child = self.children[rank]
        while True:
            try:
                child.to_child.send(frame, flags=zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                code = child.proc.poll()
                if code is not None:
                    raise WorkerDiedError(f"{self._who(rank)} exited with code {code}") from None
                child.to_child.poll(POLL_MS, zmq.POLLOUT)

    def _take(self, rank: int) -> object:
        msg = decode(self.children[rank].from_child.recv(copy=False).buffer)
        if isinstance(msg, EngineDead):
            raise WorkerDiedError(msg.reason if self.size == 1
                                  else f"rank {rank}: {msg.reason}")
        return msg

    def _who(self, rank: int) -> str:
        return "worker process" if self.size == 1 else f"worker rank {rank}"

    def shutdown(self) -> None:
        """Ask every rank to exit, give them 5 s together, then kill what is left."""
        children, self.children = self.children, []
        for child in children:
            if child.proc.poll() is None:
                with contextlib.suppress(zmq.ZMQError):
                    child.to_child.send(encode(Shutdown()), flags=zmq.NOBLOCK)
        deadline = time.monotonic() + 5
        for child in children:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            child.close()
        if self.rendezvous is not None:
            shutil.rmtree(self.rendezvous, ignore_errors=True)
            self.rendezvous = None


class RankMerge:
    """The tensor-parallel ranks' answers as one worker's.

    The model's results come from rank 0 (every rank computed the same logits). A tier
    transfer or probe is reported once every rank has reported it (ranks may finish their
    shard's I/O in different steps): ok only if ok everywhere, the slowest rank's seconds,
    the fewest blocks any rank's remote store holds. At start-up a disk block counts only if
    every rank found its shard; capacities are the smallest rank's, block bytes the sum."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.done: dict[int, list[KVDone]] = {}
        self.probed: dict[int, list[KVProbed]] = {}

    def ready(self, msgs: list[Any]) -> WorkerReady:
        first: WorkerReady = msgs[0]
        if self.size == 1:
            return first
        on_all = set.intersection(*(set(m.disk_keys) for m in msgs))
        return msgspec.structs.replace(
            first, num_device_blocks=min(m.num_device_blocks for m in msgs),
            kv_block_bytes=sum(m.kv_block_bytes for m in msgs),
            kv_tier_block_bytes=sum(m.kv_tier_block_bytes for m in msgs),
            num_host_blocks=min(m.num_host_blocks for m in msgs),
            num_disk_blocks=min(m.num_disk_blocks for m in msgs),
            disk_keys=[k for k in first.disk_keys if k in on_all],
            disk_writable=all(m.disk_writable for m in msgs),
            kv_disk_corrupt_files=sum(m.kv_disk_corrupt_files for m in msgs))

    def step(self, outs: list[Any]) -> ModelRunnerOutput:
        first: ModelRunnerOutput = outs[0]
        if self.size == 1:
            return first
        done: list[KVDone] = []
        probed: list[KVProbed] = []
        for out in outs:
            done.extend(self._fold(self.done, out.kv_done, _merge_done))
            probed.extend(self._fold(self.probed, out.kv_probed, _merge_probed))
        ups = [o.remote_up for o in outs if o.remote_up is not None]
        return msgspec.structs.replace(
            first, kv_done=done, kv_probed=probed,
            kv_disk_corrupt_files=sum(o.kv_disk_corrupt_files for o in outs),
            remote_up=all(ups) if ups else None)

    def _fold(self, pending: dict[int, list[Any]], items: list[Any],
              merge: Any) -> list[Any]:
        """Items whose op every rank has now reported, merged."""
        complete = []
        for item in items:
            reports = pending.setdefault(item.op_id, [])
            reports.append(item)
            if len(reports) == self.size:
                complete.append(merge(pending.pop(item.op_id)))
        return complete


def _merge_done(reports: list[KVDone]) -> KVDone:
    failed = [r for r in reports if not r.ok]
    if not failed:
        return KVDone(op_id=reports[0].op_id, ok=True, seconds=max(r.seconds for r in reports))
    return msgspec.structs.replace(failed[0], seconds=max(r.seconds for r in reports))


def _merge_probed(reports: list[KVProbed]) -> KVProbed:
    kinds = [r.error_kind for r in reports if r.error_kind is not None]
    return KVProbed(op_id=reports[0].op_id, found=min(r.found for r in reports),
                    error_kind=kinds[0] if kinds else None)

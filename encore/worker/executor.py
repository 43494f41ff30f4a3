"""In-process executor: the model runner in the engine's own process (tests, offline)."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from encore.configs import EncoreConfig
from encore.protocol.executor import Executor, MaskSource, WorkerDiedError
from encore.protocol.messages import ModelRunnerOutput, SchedulerOutput, WorkerReady

if TYPE_CHECKING:  # the model (torch) loads only when the worker starts
    from encore.worker.worker import Worker


class InprocExecutor(Executor):
    def __init__(self, config: EncoreConfig) -> None:
        self.config = config
        self.worker: Worker | None = None
        self.outputs: deque[ModelRunnerOutput] = deque()  # answered, not yet collected

    def start(self) -> WorkerReady:
        from encore.worker.worker import Worker

        if self.config.worker.tensor_parallel_size > 1:
            raise WorkerDiedError("tensor_parallel_size > 1 is not supported in-process: "
                                  "the ranks are worker processes (use MPExecutor)")
        if self.worker is None:
            try:
                self.worker = Worker(self.config)
            except Exception as e:
                raise WorkerDiedError(f"{type(e).__name__}: {e}") from e
        return self.worker.ready_message()

    def submit(self, step: SchedulerOutput, masks: MaskSource | None = None) -> None:
        if self.worker is None:
            raise WorkerDiedError("worker is not running")
        try:
            self.worker.submit(step, masks if step.grammar_follows else None,
                               self.outputs.append)
        except Exception as e:
            raise WorkerDiedError(f"worker failed a step: {type(e).__name__}: {e}") from e

    def collect(self, drain: bool = False) -> ModelRunnerOutput:
        if self.worker is None:
            raise WorkerDiedError("worker is not running")
        if drain:
            try:
                self.worker.drain(self.outputs.append)
            except Exception as e:
                raise WorkerDiedError(f"worker failed a step: {type(e).__name__}: {e}") from e
        if not self.outputs:
            raise WorkerDiedError("no step output to collect")
        return self.outputs.popleft()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
        self.worker: Worker | None = None
        self.outputs.clear()


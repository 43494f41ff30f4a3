"""In-process executor: the model runner in the engine's own process (tests, offline)."""

from __future__ import annotations

from configs import EncoreConfig
from scheduler.executor import Executor, WorkerDiedError
from scheduler.protocol import ModelRunnerOutput, SchedulerOutput, WorkerReady


class InprocExecutor(Executor):
    def __init__(self, config: EncoreConfig) -> None:
        self.config = config
        self.runner = None

    def start(self) -> WorkerReady:
        from worker.kv_tiers import TieredRunner

        if self.runner is None:
            try:
                self.runner = TieredRunner(self.config)
            except Exception as e:
                raise WorkerDiedError(f"{type(e).__name__}: {e}") from e
        return self.runner.ready_message()

    def execute(self, step: SchedulerOutput) -> ModelRunnerOutput:
        if self.runner is None:
            raise WorkerDiedError("worker is not running")
        try:
            return self.runner.execute(step)
        except Exception as e:
            raise WorkerDiedError(f"worker failed a step: {type(e).__name__}: {e}") from e

    def shutdown(self) -> None:
        if self.runner is not None:
            self.runner.close()
        self.runner = None

"""InprocEngineClient: the engine loop on a thread of this process (tests, offline use).

The ``executor`` decides where the model runs: ``worker.executor.InprocExecutor`` (in this
process) or ``scheduler.executor.MPExecutor`` (a worker child process).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading

from encore.configs import EncoreConfig
from encore.protocol.client import BaseEngineClient, EngineError
from encore.protocol.executor import Executor, WorkerDiedError
from encore.protocol.messages import EngineOutputs, EngineReady, Shutdown
from encore.scheduler.engine import EngineCore, EngineLoop


class InprocEngineClient(BaseEngineClient):
    """Engine loop on a background thread; ``executor`` decides where the model runs."""

    def __init__(self, config: EncoreConfig, executor: Executor, model_name: str = "") -> None:
        super().__init__()
        self.core = EngineCore(config, executor, model_name)
        self.inbox: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def _send(self, msg) -> None:
        self.inbox.put(msg)

    def _emit(self, batch: EngineOutputs) -> None:
        assert self.loop is not None
        with contextlib.suppress(RuntimeError):  # the event loop may be closing
            self.loop.call_soon_threadsafe(self.router.dispatch, batch)

    def _run(self) -> None:
        try:
            EngineLoop(self.core, self.inbox, self._emit).run()
        except WorkerDiedError as e:
            self._ready = False
            assert self.loop is not None
            self.loop.call_soon_threadsafe(self.router.fail_all, f"engine stopped: {e}")

    async def start(self) -> EngineReady:
        self.loop = asyncio.get_running_loop()
        try:
            self.info = await asyncio.to_thread(self.core.start)
        except WorkerDiedError as e:
            raise EngineError(f"the engine could not start: {e}") from e
        self.thread = threading.Thread(target=self._run, daemon=True, name="engine-loop")
        self.thread.start()
        self._ready = True
        return self.info

    async def shutdown(self) -> None:
        self._ready = False
        if self.thread is not None:
            self.inbox.put(Shutdown())
            await asyncio.to_thread(self.thread.join, 30)
            self.thread = None
        self.core.shutdown()

"""MPEngineClient: the engine (P1) as a child process, which runs the worker (P2) as its own.

Requests go out on a ZMQ PUSH socket; a reader task routes ``EngineOutputs`` to per-request
queues. A watchdog notices if P1 dies, fails its requests and restarts it. This module does not
import the scheduler core, so the API process stays free of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from typing import cast

import zmq
import zmq.asyncio

from encore.configs import EncoreConfig
from encore.protocol.client import BaseEngineClient, EngineError
from encore.protocol.messages import (
    EngineDead,
    EngineOutputs,
    EngineReady,
    Shutdown,
    decode,
    encode,
)
from encore.protocol.spawn import Child, spawn_child

logger = logging.getLogger(__name__)


class MPEngineClient(BaseEngineClient):
    """The engine as a child process (which starts the worker as its child)."""

    WATCH_S = 0.25

    def __init__(self, config: EncoreConfig, model_name: str = "", restart: bool = True) -> None:
        super().__init__()
        self.config = config
        self.model_name = model_name
        self.restart = restart
        self.ctx = zmq.asyncio.Context()
        self.child: Child | None = None
        self.tasks: list[asyncio.Task] = []
        self._closing = False

    def _send(self, msg) -> None:
        self.to_engine.send(encode(msg), copy=False)

    def _spawn(self) -> None:
        self.child = spawn_child(
            self.ctx, "encore.scheduler.engine_main", self.config, "--model-name", self.model_name)
        self.to_engine = cast(zmq.asyncio.Socket, self.child.to_child)  # an asyncio context's
        self.from_engine = cast(zmq.asyncio.Socket, self.child.from_child)

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.child.proc if self.child else None

    async def _handshake(self) -> EngineReady:
        assert self.proc is not None, "_spawn first"
        timeout = self.config.worker.start_timeout_s
        while True:
            if await self.from_engine.poll(int(self.WATCH_S * 1000)):
                msg = decode(await self.from_engine.recv())
                if isinstance(msg, EngineReady):
                    return msg
                if isinstance(msg, EngineDead):
                    raise EngineError(f"the engine could not start: {msg.reason}")
            elif self.proc.poll() is not None:
                raise EngineError(f"the engine process exited with code {self.proc.returncode}")
            timeout -= self.WATCH_S
            if timeout <= 0:
                raise EngineError("the engine did not start in time")

    async def start(self) -> EngineReady:
        self._spawn()
        try:
            self.info = await self._handshake()
        except EngineError:
            await self._stop_process()
            raise
        self._ready = True
        self.tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch())]
        return self.info

    async def _read(self) -> None:
        while True:
            msg = decode(await self.from_engine.recv())
            if isinstance(msg, EngineOutputs):
                self.router.dispatch(msg)
            elif isinstance(msg, EngineDead):
                logger.error("engine reported it cannot continue: %s", msg.reason)
                self._ready = False
                self.router.fail_all(f"engine stopped: {msg.reason}")

    async def _watch(self) -> None:
        """Notice a dead engine process; fail its requests; restart it (P0 restarts P1)."""
        while not self._closing:
            await asyncio.sleep(self.WATCH_S)
            if self.proc is None or self.proc.poll() is None or self._closing:
                continue
            logger.error("engine process exited with code %s", self.proc.returncode)
            self._ready = False
            self.router.fail_all("the engine process died")
            if not self.restart:
                return
            self.tasks[0].cancel()
            self._close_sockets()
            self._spawn()
            try:
                self.info = await self._handshake()
            except EngineError as e:
                logger.error("engine restart failed: %s", e)
                return
            self.tasks[0] = asyncio.create_task(self._read())
            self._resend_setup()
            self._ready = True

    def _close_sockets(self) -> None:
        if self.child is not None:
            self.child.close()

    async def _stop_process(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(zmq.ZMQError):
                self._send(Shutdown())
            try:  # the engine may flush its KV cache to disk first
                await asyncio.to_thread(self.proc.wait, self._stop_timeout_s())
            except subprocess.TimeoutExpired:
                logger.error("the engine did not stop in time; killing it")
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        self._close_sockets()
        self.child = None

    def _stop_timeout_s(self) -> float:
        return self.config.cache.shutdown_flush_timeout_s + 15.0

    def begin_shutdown(self) -> None:
        """The server is shutting down: from now on a dead engine is not restarted."""
        self._closing = True

    async def shutdown(self) -> None:
        self._closing = True
        self._ready = False
        for t in self.tasks:
            t.cancel()
        await self._stop_process()

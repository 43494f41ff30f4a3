"""The interface the API server (and offline users) talk to: ``EngineClient``.

Implementations live in ``scheduler.clients``: an in-process one (engine loop on a thread,
worker in-process or as a child process) and a multi-process one (P1 and P2 as children).
FastAPI routes depend only on this interface.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from scheduler.protocol import EngineReady, EngineRequest, EngineStats, RequestOutput


class EngineError(RuntimeError):
    """The engine failed a request (worker died, engine gone); the message is user-safe."""


class EngineClient(abc.ABC):
    """Async handle on a running engine."""

    @abc.abstractmethod
    async def start(self) -> EngineReady:
        """Start the engine (load the model); return its description once ready."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True while the engine can take requests (``/health`` 200)."""

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Submit ``request`` and yield its outputs until every sequence has finished.

        Each yielded ``RequestOutput`` carries the *new* tokens of one sequence (``index``).
        Leaving the iterator early (``aclose``/cancellation) aborts the request.
        Raises ``EngineError`` if the engine fails the request.
        """

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed at once. Unknown ids are ignored."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Latest gauges (and counters accumulated since start) from the engine."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine and its processes."""

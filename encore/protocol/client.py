"""The interface the API server (and offline users) talk to: ``EngineClient``.

Implementations: ``scheduler.inproc_client.InprocEngineClient`` (engine loop on a thread,
worker in-process or as a child process) and ``scheduler.mp_client.MPEngineClient`` (P1 and P2
as child processes; what the API server uses, so the server never imports the scheduler core).
FastAPI routes depend only on this interface.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator

from encore.protocol.messages import (
    AbortRequest,
    EngineOutputs,
    EngineReady,
    EngineRequest,
    GrammarVocab,
    RequestOutput,
    Shutdown,
    ToolCalled,
)
from encore.protocol.metrics import EngineTotals


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
    def tool_called(self, program: str, tools: list[str], cache_salt: str | None = None) -> None:
        """The turn of agent program ``program`` (of tenant ``cache_salt``) that just ended
        called ``tools`` (function names, parsed by the server): TTL pins learn how long each
        tool pauses a program."""

    @abc.abstractmethod
    def stats(self) -> EngineTotals:
        """The engine's metrics: latest gauges, counters and histograms since start."""

    def set_grammar_vocab(self, msg: GrammarVocab) -> None:  # noqa: B027 - optional hook
        """The tokenizer that grammars (structured outputs) compile against; an engine that
        restarts gets it again. Without it a constrained request fails."""

    def begin_shutdown(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """The server began shutting down (a signal arrived): restart nothing from now on."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine and its processes."""


class _Router:
    """Routes outputs to per-request queues and accumulates the engine's metrics."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue] = {}
        self.totals = EngineTotals()

    def dispatch(self, batch: EngineOutputs) -> None:
        for out in batch.outputs:
            q = self.queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
        if batch.stats is not None:
            self.totals.add(batch.stats)

    def fail_all(self, reason: str) -> None:
        for q in self.queues.values():
            q.put_nowait(EngineError(reason))


class BaseEngineClient(EngineClient):
    """Request routing, readiness and stats shared by the implementations."""

    def __init__(self) -> None:
        self.router = _Router()
        self._ready = False
        self.info: EngineReady | None = None
        self._grammar_vocab: GrammarVocab | None = None

    @property
    def ready(self) -> bool:
        """The engine answers and its worker runs (``worker_up``: 0 while it restarts)."""
        return self._ready and self.router.totals.values.get("worker_up", 1.0) != 0

    def stats(self) -> EngineTotals:
        return self.router.totals

    def _send(self, msg: EngineRequest | AbortRequest | ToolCalled | GrammarVocab | Shutdown
              ) -> None:
        raise NotImplementedError

    def set_grammar_vocab(self, msg: GrammarVocab) -> None:
        self._grammar_vocab = msg
        if self._ready:
            self._send(msg)

    def _resend_setup(self) -> None:
        """After a restart: what the new engine must know before any request."""
        if self._grammar_vocab is not None:
            self._send(self._grammar_vocab)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        if not self._ready:
            raise EngineError("the engine is not ready")
        if request.request_id in self.router.queues:
            raise EngineError(f"duplicate request id {request.request_id!r}")
        q: asyncio.Queue = asyncio.Queue()
        self.router.queues[request.request_id] = q
        remaining = request.sampling.n
        try:
            self._send(request)
            while remaining:
                item = await q.get()
                if isinstance(item, EngineError):
                    raise item
                if item.finish_reason == "error":
                    raise EngineError(item.error or "the engine failed the request")
                if item.finish_reason is not None:
                    remaining -= 1
                yield item
        finally:
            self.router.queues.pop(request.request_id, None)
            if remaining and self._ready:
                self._send(AbortRequest([request.request_id]))

    async def abort(self, request_id: str) -> None:
        if self._ready:
            self._send(AbortRequest([request_id]))

    def tool_called(self, program: str, tools: list[str], cache_salt: str | None = None) -> None:
        if self._ready:
            self._send(ToolCalled(program, tools, cache_salt))

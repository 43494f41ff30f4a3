"""From engine outputs to text: per-sequence detokenization, stop strings and timing.

``stream_request`` drives one ``EngineRequest``: it yields a :class:`SeqDelta` per engine
output, stops (and aborts the engine request) once every sequence has matched a stop
string, and records request metrics. ``merge_streams`` interleaves several requests (a
completions call with a list of prompts).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from encore.protocol.client import EngineError
from encore.protocol.messages import EngineRequest, RequestOutput, TokenLogprobs
from encore.server.detokenizer import IncrementalDetokenizer
from encore.server.metrics import ServerMetrics
from encore.server.serving import ServingContext
from encore.server.stop import StopMatcher


@dataclass
class SeqDelta:
    """New output of one choice. ``index`` is the choice index in the response."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    output: RequestOutput | None = None  # the engine output it came from (usage, prompt lps)


class SequenceTracker:
    """Text state of one sequence: detokenizer + stop matcher. Mutates only itself."""

    def __init__(self, index: int, tokenizer: Any, prompt_ids: list[int],
                 stops: list[str]) -> None:
        self.index = index
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stop = StopMatcher(stops)
        self.num_tokens = 0
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def apply(self, out: RequestOutput) -> SeqDelta:
        delta = SeqDelta(self.index, output=out)
        if self.finished:
            return delta
        lps = out.logprobs or []
        for i, tok in enumerate(out.new_token_ids):
            self.num_tokens += 1
            delta.token_ids.append(tok)
            if i < len(lps):
                delta.logprobs.append(lps[i])
            is_stop_token = (out.finish_reason == "stop" and out.stop_token_id == tok
                             and i == len(out.new_token_ids) - 1)
            if not is_stop_token and self._emit(delta, self._detok.push(tok)):
                return delta
        if out.finish_reason is not None:
            self._finish(delta, out)
        return delta

    def _emit(self, delta: SeqDelta, piece: str) -> bool:
        text, matched = self._stop.feed(piece)
        delta.text += text
        if matched:
            self.finish_reason = delta.finish_reason = "stop"
        return matched

    def _finish(self, delta: SeqDelta, out: RequestOutput) -> None:
        if out.finish_reason == "error":
            raise EngineError(out.error or "the engine failed the request")
        if self._emit(delta, self._detok.flush()):
            return
        delta.text += self._stop.flush()
        self.finish_reason = delta.finish_reason = out.finish_reason


@dataclass
class RequestTiming:
    """Latency bookkeeping of one engine request (monotonic clock)."""

    arrival: float
    submitted: float = 0.0
    first_token: float | None = None
    last_token: float | None = None

    def on_tokens(self, now: float, metrics: ServerMetrics) -> None:
        if self.first_token is None:
            self.first_token = now
            metrics.ttft.observe(now - self.arrival)
        elif self.last_token is not None:
            metrics.itl.observe(now - self.last_token)
        self.last_token = now


async def stream_request(ctx: ServingContext, request: EngineRequest,
                         trackers: list[SequenceTracker],
                         arrival: float) -> AsyncIterator[SeqDelta]:
    """Yield deltas of ``request`` until all its sequences finish; abort it if we stop early.

    ``trackers[i]`` handles engine sequence ``i``. Raises EngineError on engine failure.
    Counts the request's sequences in ``ctx.in_flight`` while it runs.
    """
    engine, metrics = ctx.engine, ctx.metrics
    ctx.in_flight += request.sampling.n
    timing = RequestTiming(arrival=arrival, submitted=time.monotonic())
    metrics.queue_time.observe(timing.submitted - arrival)
    metrics.prompt_tokens.inc(len(request.prompt_token_ids))
    metrics.request_prompt_tokens.observe(len(request.prompt_token_ids))
    gen = engine.generate(request)
    reason = "abort"
    try:
        async for out in gen:
            if out.new_token_ids:
                timing.on_tokens(time.monotonic(), metrics)
            yield trackers[out.index].apply(out)
            if all(t.finished for t in trackers):
                reason = _overall_reason(trackers)
                break
    finally:
        with anyio.CancelScope(shield=True):
            await gen.aclose()
            if reason == "abort" or any(t.finish_reason == "stop" for t in trackers):
                await engine.abort(request.request_id)
        ctx.in_flight -= request.sampling.n
        _record_end(metrics, trackers, timing, reason)


def _overall_reason(trackers: list[SequenceTracker]) -> str:
    reasons = {t.finish_reason for t in trackers}
    for r in ("abort", "length", "stop"):
        if r in reasons:
            return r
    return "stop"


def _record_end(metrics: ServerMetrics, trackers: list[SequenceTracker],
                timing: RequestTiming, reason: str) -> None:
    generated = sum(t.num_tokens for t in trackers)
    metrics.generation_tokens.inc(generated)
    metrics.request_generation_tokens.observe(generated)
    metrics.e2e.observe(time.monotonic() - timing.arrival)
    metrics.request_success.labels(finished_reason=reason).inc()


async def merge_streams(streams: list[AsyncIterator[SeqDelta]]) -> AsyncIterator[SeqDelta]:
    """Interleave several delta streams as items arrive; close them all on exit."""
    if len(streams) == 1:
        stream: Any = streams[0]
        try:
            async for item in stream:
                yield item
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, stream: Any) -> None:
        try:
            async for item in stream:
                await queue.put((0, item))
            await queue.put((1, None))
        except Exception as e:  # forwarded to the consumer
            await queue.put((2, e))
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            kind, item = await queue.get()
            if kind == 0:
                yield item
            elif kind == 1:
                remaining -= 1
            else:
                raise item
    finally:
        for t in tasks:
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)

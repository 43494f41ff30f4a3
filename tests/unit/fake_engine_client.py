"""A scripted EngineClient and a byte-level tokenizer for route tests (no model, no torch).

FakeTokenizer: token id = one UTF-8 byte (0..255); 256 = eos. Multi-byte characters are
split across tokens, which is exactly what the incremental detokenizer must survive.
FakeEngineClient: each sequence "generates" the bytes of ``script(request, index)``, one
output per token, then eos (finish "stop") or hits max_tokens (finish "length").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from encore.protocol.client import EngineClient, EngineError
from encore.protocol.messages import (
    EngineReady,
    EngineRequest,
    EngineStats,
    Logprob,
    RequestOutput,
    TokenLogprobs,
)
from encore.protocol.metrics import EngineTotals

EOS = 256


class FakeTokenizer:
    vocab_size = 257
    eos_token_ids = [EOS]
    has_chat_template = True

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        if not skip_special_tokens and EOS in ids:
            text += "</s>"
        return text

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.decode([i], skip_special_tokens=False) for i in ids]

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def default_script(request: EngineRequest, index: int) -> str:
    return f"Hello {index}! Grüße 🌍 from the fake engine."


class FakeEngineClient(EngineClient):
    """Scripted engine. Records submitted requests and aborts; ``delay`` s between tokens."""

    def __init__(self, script: Callable[[EngineRequest, int], str] = default_script,
                 delay: float = 0.0, max_model_len: int = 512, ready: bool = True,
                 fail_with: str | None = None) -> None:
        self.script = script
        self.delay = delay
        self.max_model_len = max_model_len
        self._ready_after_start = ready
        self._ready = False
        self.fail_with = fail_with
        self.requests: list[EngineRequest] = []
        self.aborted: list[str] = []
        self.tools_called: list[tuple[str, list[str]]] = []  # (program, tool names)
        self.active: set[str] = set()
        self.seen_prompts: list[list[int]] = []
        self.prefix = {"prefix_queries": 0, "prefix_hits": 0}  # cumulative
        self.shut_down = False

    async def start(self) -> EngineReady:
        self._ready = self._ready_after_start
        return EngineReady(model_name="fake-model", max_model_len=self.max_model_len,
                           vocab_size=FakeTokenizer.vocab_size, num_device_blocks=64,
                           block_size=16, device="cpu", dtype="float32")

    @property
    def ready(self) -> bool:
        return self._ready

    def stats(self) -> EngineTotals:
        totals = EngineTotals()
        totals.add(EngineStats(values={"num_running": len(self.active), "num_waiting": 0,
                                       "kv_cache_usage": 0.01 * len(self.active),
                                       **self.prefix}))
        return totals

    def _cached(self, prompt: list[int]) -> int:
        best = 0
        for old in self.seen_prompts:
            n = 0
            while n < min(len(old), len(prompt)) and old[n] == prompt[n]:
                n += 1
            best = max(best, n // 16 * 16)
        self.seen_prompts.append(prompt)
        return min(best, (len(prompt) - 1) // 16 * 16)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        if not self._ready:
            raise EngineError("the engine is not ready")
        self.requests.append(request)
        self.active.add(request.request_id)
        cached = self._cached(request.prompt_token_ids)
        self.prefix["prefix_queries"] += len(request.prompt_token_ids)
        self.prefix["prefix_hits"] += cached
        try:
            plan = [self._plan(request, i) for i in range(request.sampling.n)]
            step = 0
            while any(step < len(p) for p in plan):
                for i, p in enumerate(plan):
                    if step < len(p):
                        yield self._output(request, i, p, step, cached)
                step += 1
                await asyncio.sleep(self.delay)
        finally:
            self.active.discard(request.request_id)

    def _plan(self, request: EngineRequest, index: int) -> list[int]:
        if self.fail_with:
            return [-1]
        sp = request.sampling
        toks = list(self.script(request, index).encode("utf-8"))
        if not sp.ignore_eos:
            toks.append(EOS)
        return toks[:sp.max_tokens]

    def _output(self, request: EngineRequest, index: int, plan: list[int], step: int,
                cached: int) -> RequestOutput:
        if plan[step] == -1:
            return RequestOutput(request.request_id, index, finish_reason="error",
                                 error=self.fail_with)
        tok = plan[step]
        last = step == len(plan) - 1
        finish = ("stop" if tok == EOS else "length") if last else None
        sp = request.sampling
        lps = None
        if sp.logprobs is not None:
            top = [Logprob(tok, -0.5)] + [Logprob((tok + k) % 256, -1.0 - k)
                                          for k in range(1, sp.logprobs)]
            lps = [TokenLogprobs(tok, -0.5, top[:sp.logprobs])]
        plps = None
        if step == 0 and sp.prompt_logprobs is not None:
            plps = [None] + [TokenLogprobs(t, -2.0, []) for t in request.prompt_token_ids[1:]]
        return RequestOutput(request.request_id, index, [tok], lps, plps, finish,
                             stop_token_id=tok if finish == "stop" else None,
                             num_prompt_tokens=len(request.prompt_token_ids),
                             num_cached_tokens=cached)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.active.discard(request_id)

    def tool_called(self, program: str, tools: list[str], cache_salt: str | None = None) -> None:
        self.tools_called.append((program, tools))

    async def shutdown(self) -> None:
        self.shut_down = True
        self._ready = False

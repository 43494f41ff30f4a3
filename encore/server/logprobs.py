"""Logprobs in the two OpenAI shapes: chat (``content`` entries) and legacy completions."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from encore.protocol.messages import TokenLogprobs

TokenText = Callable[[int], str]
# What a token the sampler had masked (logprob -inf) reports, as vLLM does: JSON has no
# -Infinity, and a client parsing the response must never meet NaN either.
MASKED_LOGPROB = -9999.0


def finite(logprob: float) -> float:
    """``logprob``, or MASKED_LOGPROB when it is not a finite number."""
    return logprob if math.isfinite(logprob) else MASKED_LOGPROB


def _entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(token_text: TokenText, lps: list[TokenLogprobs],
                  top_k: int) -> list[dict[str, Any]]:
    """Chat ``logprobs.content`` entries for the given tokens."""
    out = []
    for lp in lps:
        entry = _entry(token_text(lp.token_id), lp.logprob)
        entry["top_logprobs"] = [_entry(token_text(t.token_id), t.logprob)
                                 for t in lp.top[:top_k]]
        out.append(entry)
    return out


class CompletionLogprobs:
    """Accumulates ``{tokens, token_logprobs, top_logprobs, text_offset}`` for one choice."""

    def __init__(self, token_text: TokenText, top_k: int, text_offset: int = 0) -> None:
        self._text = token_text
        self._k = top_k
        self.offset = text_offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add_prompt(self, token_ids: list[int], lps: list[TokenLogprobs | None] | None) -> None:
        """Echoed prompt tokens; the first has no logprob."""
        lps = lps or []
        for i, tok in enumerate(token_ids):
            lp = lps[i] if i < len(lps) else None
            self._add(tok, lp)

    def add(self, lps: list[TokenLogprobs]) -> None:
        for lp in lps:
            self._add(lp.token_id, lp)

    def _add(self, token_id: int, lp: TokenLogprobs | None) -> None:
        text = self._text(token_id)
        self.tokens.append(text)
        self.text_offset.append(self.offset)
        self.offset += len(text)
        if lp is None:
            self.token_logprobs.append(None)
            self.top_logprobs.append(None)
            return
        self.token_logprobs.append(finite(lp.logprob))
        top = {self._text(t.token_id): finite(t.logprob) for t in lp.top[:self._k]}
        self.top_logprobs.append(top)

    def body(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}

    def take(self) -> dict[str, Any]:
        """The entries added since the last take (for streaming chunks)."""
        body = self.body()
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return body

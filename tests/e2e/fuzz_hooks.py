"""schemathesis hooks for fuzzing Encore's /openapi.json (tests/e2e/test_fuzz_openapi.py).

Loaded by the schemathesis CLI through ``SCHEMATHESIS_HOOKS=tests.e2e.fuzz_hooks``.

- ``before_call`` caps what makes a case expensive on a CPU (tokens to generate, ``n``, number
  of prompts), so a few hundred cases take minutes; every other field stays as generated.
- ``finite_json`` fails a case whose response carries NaN or ±Infinity anywhere (JSON has
  neither; Python's parser would accept them), or whose event stream reports an error (a
  stream's 200 is sent before generation, so an engine failure there is a hidden 5xx).
"""

from __future__ import annotations

import json
import math
from typing import Any

import schemathesis

MAX_TOKENS = 4  # per sequence: enough to exercise sampling, logprobs and stop strings
MAX_N = 2
MAX_PROMPTS = 2


def _capped(value: Any, cap: int) -> Any:
    """``value`` at most ``cap`` when it is a number (2.0 is a valid ``n`` too)."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return min(value, cap) if is_number else value


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case,
                kwargs: dict[str, Any]) -> None:
    """Every phase's cases (``map_body`` misses the coverage phase) get capped bodies."""
    case.body = capped_body(case.body)


def capped_body(body: Any) -> Any:
    """Cap generation cost; a missing output budget (chat: the whole context) becomes 4
    (``max_output_tokens`` is the responses API's; each endpoint ignores the others')."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(field)
        body[field] = MAX_TOKENS if value is None else _capped(value, MAX_TOKENS)
    if "n" in body:
        body["n"] = _capped(body["n"], MAX_N)
    if isinstance(body.get("prompt"), list) and len(body["prompt"]) > MAX_PROMPTS:
        first = body["prompt"][0]
        if isinstance(first, list | str):  # a list of prompts, not one prompt of token ids
            body["prompt"] = body["prompt"][:MAX_PROMPTS]
    return body


def _no_constant(name: str) -> Any:
    raise AssertionError(f"response body has the non-JSON number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise AssertionError(f"response body has a number that is not finite: {text[:40]}")
    return value


def _strict_json(text: str) -> Any:
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)


@schemathesis.check
def finite_json(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                case: schemathesis.Case) -> bool | None:
    """Every JSON document in the body (an SSE stream: every event) is finite; no stream
    carries an error event."""
    media = (response.headers.get("content-type") or [""])[0].split(";")[0].strip()
    text = response.content.decode("utf-8")
    if media == "application/json":
        _strict_json(text)
    elif media == "text/event-stream":
        for block in filter(None, text.split("\n\n")):
            data = block.removeprefix("data: ")
            event = _strict_json(data) if data != "[DONE]" else {}
            if "error" in event or event.get("type") == "error":  # chat / responses streams
                raise AssertionError(f"stream reports an error: {data[:200]}")
    return None

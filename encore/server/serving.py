"""Shared request handling: the serving context, admission, limits and engine requests."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

from fastapi import Request

from encore.configs.secrets import deployment_secret, tenant_salt
from encore.configs.types import EncoreConfig, ServerConfig
from encore.protocol.client import EngineClient
from encore.protocol.messages import EngineReady, EngineRequest, GrammarSpec, SamplingParams
from encore.server.errors import APIError, invalid
from encore.server.metrics import ServerMetrics
from encore.server.schemas import _CommonRequest, decode_json

T = TypeVar("T")
RETRY_AFTER_S = 5
MAX_KEY_CHARS = 1024  # prompt_cache_key, job_id, session_id, X-Session-ID
_DISCONNECT_POLL_S = 0.25
# Below this a temperature is greedy: dividing logits by it overflows float32 (vLLM's bound).
GREEDY_TEMPERATURE = 1e-5


@dataclass
class ServingContext:
    """Everything a route needs; one per app. ``ready`` is set once the engine has started."""

    config: EncoreConfig
    engine: EngineClient
    tokenizer: Any
    metrics: ServerMetrics
    info: EngineReady | None = None
    model_name: str = ""
    in_flight: int = 0  # sequences submitted by this process and not finished
    # Most UTF-8 bytes one token spells (+1), measured at start-up; None until then.
    max_token_bytes: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    responses: Any = None  # the /v1/responses store (server.responses), opened on first use
    grammar_ready: bool = False  # the engine has the tokenizer grammars compile against

    tenants: dict[str, str] = field(default_factory=dict)  # API key -> its cache salt

    def __post_init__(self) -> None:
        self.token_text = lru_cache(maxsize=65536)(self._token_text)
        keys = api_keys(self.config.server)
        if keys:
            secret = deployment_secret(self.config.cache)
            self.tenants = {k: tenant_salt(secret, k) for k in keys}

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    @property
    def max_model_len(self) -> int:
        assert self.info is not None
        return self.info.max_model_len

    @property
    def vocab_size(self) -> int:
        assert self.info is not None
        return self.info.vocab_size


def cache_block_size(ctx: ServingContext) -> int:
    """The KV block size when prefix caching keeps computed blocks, else 0 (usage's
    ``cache_write_tokens``)."""
    cache = ctx.config.cache
    return cache.block_size if cache.enable_prefix_caching else 0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def api_keys(server: ServerConfig) -> list[str]:
    """``api_keys`` plus the keys in ``api_keys_file`` (one per line; blank lines and lines
    starting with # are skipped). Raises ValueError naming the file if it cannot be read."""
    keys = list(server.api_keys)
    if server.api_keys_file:
        try:
            with open(server.api_keys_file, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except OSError as e:
            raise ValueError(f"api_keys_file {server.api_keys_file!r}: {e.strerror}") from None
        keys += [line for line in lines if line and not line.startswith("#")]
    return list(dict.fromkeys(keys))


def check_api_key(ctx: ServingContext, request: Request) -> str | None:
    """401 unless the Bearer token is one of the configured keys (constant-time compare).

    Returns the caller's tenant salt (None when authentication is off)."""
    if not ctx.tenants:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    salt = None
    if scheme.lower() == "bearer" and token:
        given = token.strip().encode()
        for key, key_salt in ctx.tenants.items():  # compare every key: timing hides which
            if hmac.compare_digest(given, key.encode()):
                salt = key_salt
    if salt is None:
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       code="invalid_api_key")
    return salt


def check_ready(ctx: ServingContext) -> None:
    if ctx.info is None or not ctx.engine.ready:
        raise APIError(503, "the engine is not ready; retry shortly", code="engine_not_ready",
                       retry_after=RETRY_AFTER_S)


def max_token_bytes(tokenizer: Any) -> int:
    """An upper bound on the UTF-8 bytes one token spells: the longest token decoded on its
    own, +1 because SentencePiece decoders drop a lone token's leading space. Blocking (every
    id is decoded once): call it off the event loop."""
    longest = max(len(tokenizer.decode([i], skip_special_tokens=False).encode("utf-8"))
                  for i in range(tokenizer.vocab_size))
    return longest + 1


def check_json_content_type(request: Request) -> None:
    """415 unless the body is declared JSON (no Content-Type at all is taken as JSON, as
    FastAPI does)."""
    declared = request.headers.get("content-type")
    if declared is None:
        return
    media = declared.split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise APIError(415, f"Content-Type {declared[:60]!r} is not supported; send the body "
                            "as application/json", code="unsupported_media_type")


async def read_json(ctx: ServingContext, request: Request) -> Any:
    """Read the body within ``max_body_bytes`` (413 above) and ``body_timeout_s`` (408) and
    decode it (400 if it is not strict JSON, see :func:`decode_json`)."""
    server = ctx.config.server
    limit = server.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    try:
        async with asyncio.timeout(server.body_timeout_s):
            raw = await _read_body(request, limit)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {server.body_timeout_s:g}"
                            " s (body_timeout_s)", code="request_timeout") from None
    return decode_json(raw)


async def _read_body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is larger than {limit} bytes",
                           code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def check_model(ctx: ServingContext, model: str | None) -> None:
    if model is not None and model != ctx.model_name:
        shown = model[:64] + ("..." if len(model) > 64 else "")
        raise APIError(404, f"model {shown!r} does not exist; this server serves "
                            f"{ctx.model_name!r}", param="model", code="model_not_found")


def check_num_seqs(ctx: ServingContext, num_prompts: int, n: int) -> None:
    """400 when one request alone asks for more sequences (prompts x ``n``) than the waiting
    queue holds: it could never be admitted, and queued it would lock everyone else out."""
    limit = ctx.config.server.max_waiting_requests
    if limit and num_prompts * n > limit:
        raise invalid(f"this request asks for {num_prompts * n} sequences ({num_prompts} "
                      f"prompt(s) x n={n}); this server queues at most {limit} "
                      "(max_waiting_requests)", "n" if n > 1 else "prompt")


def admit(ctx: ServingContext, num_seqs: int) -> None:
    """429 unless the waiting queue has room for ``num_seqs`` more sequences (the engine's
    count, or ours of what is in flight if the engine's lags)."""
    cfg = ctx.config
    limit = cfg.server.max_waiting_requests
    stats = ctx.engine.stats()
    waiting = stats.num_waiting if stats else 0
    if (waiting + num_seqs > limit
            or ctx.in_flight + num_seqs > limit + cfg.scheduler.max_num_seqs):
        raise APIError(429, "too many requests are waiting; retry later",
                       code="queue_full", retry_after=RETRY_AFTER_S)


def check_prompt_size(ctx: ServingContext, num_chars: int, param: str) -> None:
    """400 ``context_length_exceeded``, before paying for tokenization, when a prompt of
    ``num_chars`` characters cannot fit the context whatever its tokens: it has at least
    ``num_chars`` bytes and a token spells at most ``ctx.max_token_bytes`` of them."""
    per_token = ctx.max_token_bytes
    if per_token is None or num_chars <= ctx.max_model_len * per_token:
        return
    raise APIError(400, f"the prompt has {num_chars} characters, at least "
                        f"{-(-num_chars // per_token)} tokens; this model's context is "
                        f"{ctx.max_model_len} tokens", param=param,
                   code="context_length_exceeded")


def check_common(ctx: ServingContext, req: _CommonRequest) -> None:
    """Checks that need the server's config or the model (not expressible in the schema)."""
    if req.cache_salt is not None and not ctx.config.server.allow_client_cache_salt:
        raise invalid("cache_salt is not supported by this server (the operator has not "
                      "enabled allow_client_cache_salt)", "cache_salt")
    if req.prompt_cache_retention is not None and req.prompt_cache_options is not None:
        raise invalid("prompt_cache_retention and prompt_cache_options both set how long the "
                      "prompt stays cached; send one of them", "prompt_cache_retention")
    for tok in req.stop_token_ids or []:
        if tok >= ctx.vocab_size:
            raise invalid(f"stop_token_ids contains {tok}, beyond the vocabulary "
                          f"({ctx.vocab_size})", "stop_token_ids")


def resolve_max_tokens(ctx: ServingContext, prompt_len: int, requested: int | None,
                       param: str, prompt_param: str) -> int:
    """Output budget of one prompt; 400 when the prompt plus it exceed the context."""
    limit = ctx.max_model_len
    if prompt_len >= limit:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is "
                            f"{limit} tokens", param=prompt_param, code="context_length_exceeded")
    if prompt_len == 0:
        raise invalid("the prompt is empty", prompt_param)
    if requested is None:
        return limit - prompt_len
    if prompt_len + requested > limit:
        raise APIError(400, f"{param}={requested} plus the prompt's {prompt_len} tokens "
                            f"exceeds this model's context of {limit} tokens", param=param,
                       code="context_length_exceeded")
    return requested


def sampling_params(req: Any, max_tokens: int, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    if req.min_tokens > max_tokens:
        raise invalid(f"min_tokens={req.min_tokens} exceeds the output budget {max_tokens}",
                      "min_tokens")
    # a temperature this small is greedy; sent as 0 so every stage treats it so
    temperature = 0.0 if req.temperature < GREEDY_TEMPERATURE else req.temperature
    return SamplingParams(
        n=req.n, temperature=temperature, top_p=req.top_p, top_k=max(req.top_k, 0),
        min_p=req.min_p, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
        seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens,
        stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
        logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def cache_salt(tenant: str | None, client: str | None) -> str | None:
    """The salt of a request's cache namespace: its tenant's, refined by the client's own
    ``cache_salt`` (already checked to be allowed). With API keys every salt starts with the
    tenant's part, so no client salt can reach another tenant's namespace."""
    if tenant is None:
        return client
    return f"t:{tenant}" if client is None else f"t:{tenant}|c:{client}"


def take_session_header(req: _CommonRequest, request: Request) -> None:
    """``X-Session-ID`` (what routers hash on to keep a conversation on one replica) names
    the program when the body does not."""
    value = request.headers.get("x-session-id")
    if value is not None and len(value) > MAX_KEY_CHARS:
        raise invalid(f"X-Session-ID is longer than {MAX_KEY_CHARS} characters",
                      "X-Session-ID")
    req.session_id = req.session_id or value


def engine_request(ctx: ServingContext, req: _CommonRequest, request_id: str,
                   prompt_ids: list[int], sampling: SamplingParams,
                   arrival: float, tenant: str | None = None,
                   chunks: list[tuple[int, int]] | None = None,
                   pin_breakpoints: list[tuple[int, float]] | None = None,
                   grammar: GrammarSpec | None = None,
                   soft_pin_breakpoints: list[tuple[int, float]] | None = None
                   ) -> EngineRequest:
    """The engine's request; ``chunks`` and ``pin_breakpoints`` are token positions of the
    prompt's marked content parts (chat only, see server.chat_parts); ``grammar``: what the
    output must match (server.structured)."""
    req._engine_salt = cache_salt(tenant, req.cache_salt)
    return EngineRequest(
        request_id=request_id, prompt_token_ids=prompt_ids, sampling=sampling,
        arrival_time=arrival, eos_token_ids=list(ctx.tokenizer.eos_token_ids),
        priority=req.priority, cache_salt=req._engine_salt,
        prompt_cache_key=req.program_key(), pin_ttl_s=pin_ttl(ctx, req),
        is_last_step=req.is_last_step, chunks=list(chunks or []),
        pin_breakpoints=list(pin_breakpoints or []),
        soft_pin_breakpoints=list(soft_pin_breakpoints or []),
        persist_kv=req.prompt_cache_retention == "24h", grammar=grammar)


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """Seconds of a duration like "90s", "30m" or "12h"; None if malformed or not > 0."""
    text = text.strip().lower()
    unit = _DURATION_UNITS.get(text[-1:]) if text else None
    try:
        value = float(text[:-1]) * unit if unit is not None else None
    except ValueError:
        return None
    return value if value is not None and 0 < value < float("inf") else None


IN_MEMORY_MAX_S = 3600.0  # prompt_cache_retention "in_memory": pinned at most 1 h


def pin_ttl(ctx: ServingContext, req: _CommonRequest) -> float | None:
    """The explicit pin TTL of ``prompt_cache_options.ttl``, else the soft one of a top-level
    ``cache_control`` (None: the engine's policy picks); 400 as :func:`checked_pin_ttl`
    says."""
    opts = req.prompt_cache_options or {}
    if opts.get("ttl") is None:
        return soft_pin_ttl(ctx, req, req.cache_control)
    return checked_pin_ttl(ctx, req, opts["ttl"], "prompt_cache_options.ttl")


def soft_pin_ttl(ctx: ServingContext, req: _CommonRequest,
                 marker: dict[str, Any] | None) -> float | None:
    """Seconds of an Anthropic ``cache_control`` marker's pin (``"5m"`` unless ``"1h"``),
    capped by ``cache.max_pin_ttl_s``: a soft pin, so never a 400. None without a marker,
    without a program key (the prefix cache, always on, is then what caches it) or with pins
    off."""
    cache = ctx.config.cache
    if (marker is None or req.program_key() is None or not cache.enable_ttl_pins
            or not cache.enable_prefix_caching):
        return None
    ttl = parse_duration(str(marker.get("ttl", "5m"))) or 300.0
    return min(ttl, cache.max_pin_ttl_s)


def checked_pin_ttl(ctx: ServingContext, req: _CommonRequest, value: Any, param: str) -> float:
    """Seconds of a requested pin TTL (``prompt_cache_options.ttl`` or a content part's
    breakpoint ``ttl``, named by ``param``); 400 when malformed, above
    ``cache.max_pin_ttl_s``, without a program key, or pins are off."""
    cache = ctx.config.cache
    if not cache.enable_ttl_pins or not cache.enable_prefix_caching:
        raise invalid(f"{param} is not supported: TTL pins are turned off on this server "
                      "(cache.enable_ttl_pins)", param)
    ttl = parse_duration(value) if isinstance(value, str) else None
    if ttl is None:
        raise invalid(f"{param} must be a duration like \"90s\", \"30m\" or \"12h\"", param)
    if ttl > cache.max_pin_ttl_s:
        raise invalid(f"{param}={value!r} exceeds this server's limit of "
                      f"{cache.max_pin_ttl_s:g}s (cache.max_pin_ttl_s)", param)
    if req.prompt_cache_retention == "in_memory" and ttl > IN_MEMORY_MAX_S:
        raise invalid(f"{param}={value!r} is longer than prompt_cache_retention 'in_memory' "
                      "keeps a prompt (1 h)", param)
    if req.program_key() is None:
        raise invalid(f"{param} needs a prompt_cache_key (or job_id) naming the program whose "
                      "KV to pin", param)
    return ttl


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int,
          cache_write_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens,
                                  "cache_write_tokens": cache_write_tokens},
    }


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; cancel it (aborting its engine request) if the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class UsageTracker:
    """Token counts of one API call (possibly several engine requests).

    ``cache_write_tokens``: per engine request, the prompt tokens in complete KV blocks of
    ``block_size`` that it computed rather than reused; prefix caching keeps those blocks, so
    a later request with the same prefix reuses them. 0 when ``block_size`` is 0 (prefix
    caching off)::

        prompt      |=========== cached ===========|---- written ----|-- partial --|
                    0                        cached_tokens    (len // bs) * bs     len
    """

    def __init__(self, block_size: int = 0) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.block_size = block_size
        self._cached: dict[str, int] = {}
        self._prompts: dict[str, int] = {}  # engine request id -> its prompt tokens

    def add_prompt(self, num_tokens: int) -> None:
        self.prompt_tokens += num_tokens

    def observe(self, delta: Any) -> None:
        self.completion_tokens += len(delta.token_ids)
        out = delta.output
        if out is not None and out.num_prompt_tokens:
            self._prompts[out.request_id] = out.num_prompt_tokens
        if out is not None and out.num_cached_tokens:
            prev = self._cached.get(out.request_id, 0)
            self._cached[out.request_id] = max(prev, out.num_cached_tokens)

    def cache_write_tokens(self) -> int:
        if not self.block_size:
            return 0
        bs = self.block_size
        return sum(max(0, n // bs * bs - self._cached.get(rid, 0))
                   for rid, n in self._prompts.items())

    def body(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, self.completion_tokens, sum(self._cached.values()),
                     self.cache_write_tokens())

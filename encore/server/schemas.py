"""Pydantic models of the OpenAI request bodies Encore accepts (plus its extensions).

Unknown fields are ignored; a known field with a bad value is a 400 whose ``param`` names it
(:func:`parse_body`). Bodies are decoded by :func:`decode_json` (strict JSON: no NaN, no lone
surrogates, bounded nesting). Responses are built as plain dicts by the routes; the response
models at the end of this file describe them in ``/openapi.json``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from encore.server.errors import APIError

MAX_N = 64
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
# Every integer crosses to the engine as msgpack int64: larger ones are a 400 here, not an
# encoding failure (500) later.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_REPETITION_PENALTY = 2.0  # as SGLang; values below 1 favour repeats, above 1 avoid them

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
NonNegInt = Annotated[int, Field(ge=0, le=INT64_MAX)]
PositiveInt = Annotated[int, Field(ge=1, le=INT64_MAX)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Model):
    include_usage: bool = False


BREAKPOINT_MODES = ("implicit", "explicit", "chunk")
CACHE_CONTROL_TTLS = ("5m", "1h")  # Anthropic's ephemeral cache durations


def _cache_control(v: dict[str, Any] | None) -> dict[str, Any] | None:
    """Anthropic's ``{"type": "ephemeral", "ttl": "5m" | "1h"}`` (ttl defaults to 5m)."""
    if v is None:
        return v
    if v.get("type") != "ephemeral":
        raise ValueError("cache_control type must be 'ephemeral'")
    if v.get("ttl", "5m") not in CACHE_CONTROL_TTLS:
        raise ValueError("cache_control ttl must be '5m' or '1h'")
    return v


def _breakpoint_mode(bp: dict[str, Any]) -> Any:
    """The breakpoint's mode; without one, ``explicit`` if it has a ttl, else ``implicit``."""
    return bp.get("mode", "explicit" if bp.get("ttl") is not None else "implicit")


class ContentPart(_Model):
    """A content part; only ``text`` parts are supported. ``prompt_cache_breakpoint`` may mark
    it: ``implicit`` (a no-op: prefix caching is always on), ``explicit`` with a ``ttl`` (pin
    the prefix up to this part's end), or ``chunk`` (Encore: a position-independent chunk)."""

    type: str = Field(json_schema_extra={"enum": ["text"]})
    text: str | None = None
    prompt_cache_breakpoint: dict[str, Any] | None = None
    cache_control: dict[str, Any] | None = None  # Anthropic's marker: a soft breakpoint pin

    _check_cache_control = field_validator("cache_control")(classmethod(
        lambda cls, v: _cache_control(v)))

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v != "text":
            raise ValueError("only 'text' content parts are supported")
        return v

    @field_validator("prompt_cache_breakpoint")
    @classmethod
    def _breakpoint(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        """The mode must be known, and a ``ttl`` belongs to mode ``explicit`` only (its value
        is checked against the server's config when the prompt is built)."""
        if v is None:
            return v
        mode = _breakpoint_mode(v)
        if mode not in BREAKPOINT_MODES:
            raise ValueError(f"prompt_cache_breakpoint mode {str(mode)[:20]!r} is not one of "
                             "'implicit', 'explicit', 'chunk'")
        if v.get("ttl") is not None and mode != "explicit":
            raise ValueError(f"a ttl on a prompt_cache_breakpoint needs mode 'explicit', not "
                             f"{mode!r}")
        return v

    def breakpoint_mode(self) -> str | None:
        """``implicit``, ``explicit`` or ``chunk``; None without a breakpoint."""
        bp = self.prompt_cache_breakpoint
        return None if bp is None else _breakpoint_mode(bp)

    def breakpoint_ttl(self) -> Any:
        """The raw ``ttl`` of an explicit breakpoint (None when absent)."""
        return (self.prompt_cache_breakpoint or {}).get("ttl")


class JsonSchemaFormat(_Model):
    """``response_format.json_schema``: the schema the output must match (always enforced,
    whatever ``strict`` says)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    """``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self

    def json_schema_body(self) -> dict[str, Any] | None:
        return self.json_schema.schema_ if self.json_schema is not None else None


class FunctionDef(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    """An OpenAI function tool: ``{"type": "function", "function": {...}}``."""

    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Model):
    name: str
    arguments: str


class ToolCallIn(_Model):
    """A tool call of an earlier assistant turn, as the client sends it back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)


class _CommonRequest(_Model):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: PositiveInt | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)  # below 1e-5: greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    prompt_cache_options: dict[str, Any] | None = None
    job_id: str | None = Field(default=None, max_length=1024)
    is_last_step: bool | None = None
    session_id: str | None = Field(default=None, max_length=1024)  # or the X-Session-ID header
    # "24h": the prompt's KV goes to disk/remote at once (kept across restarts and replicas);
    # "in_memory": device/host only, explicit pins at most 1 h
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    cache_control: dict[str, Any] | None = None  # Anthropic's marker on the whole request
    # extensions
    top_k: int = Field(default=0, ge=-1, le=INT64_MAX)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=MAX_REPETITION_PENALTY)
    stop_token_ids: list[NonNegInt] | None = None
    ignore_eos: bool = False
    min_tokens: NonNegInt = 0
    priority: Int64 = 0
    cache_salt: str | None = Field(default=None, min_length=1, max_length=1024)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    _check_cache_control = field_validator("cache_control")(classmethod(
        lambda cls, v: _cache_control(v)))

    @field_validator("prompt_cache_options")
    @classmethod
    def _cache_options(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("mode", "implicit") not in ("implicit", "explicit"):
            raise ValueError("prompt_cache_options mode must be 'implicit' or 'explicit'")
        return v

    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    # the request's cache namespace (tenant and client salt), set by ``engine_request``
    _engine_salt: str | None = PrivateAttr(default=None)

    def program_key(self) -> str | None:
        """The agent program / conversation: ``prompt_cache_key``, Continuum's ``job_id``, or
        the session (``session_id``, the ``X-Session-ID`` header routers hash on)."""
        return self.prompt_cache_key or self.job_id or self.session_id


class ChatCompletionRequest(_CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_CommonRequest):
    prompt: PromptInput
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: PositiveInt | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16

    def num_logprobs(self) -> int | None:
        return self.logprobs


def _param_of(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("str", "list[str]", "list[int]", "list[list[int]]", "int", "float"):
            continue  # pydantic's union-branch labels
        elif "[" in str(item) or "-" in str(item):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


# pydantic-core's JSON parser (jiter) refuses NaN/Infinity literals, lone UTF-16 surrogate
# escapes ("\\ud800": such a str cannot be encoded, so the tokenizer would fail on it) and
# nesting deeper than about 200 levels (the stdlib parser recurses until RecursionError).
# Its messages name a position ("... at line 1 column 9"), never the input.
_SURROGATE_ERRORS = ("surrogate", "end of hex escape")
MAX_JSON_DEPTH = 200


def decode_json(raw: bytes) -> Any:
    """The decoded body; a 400 saying why when it is not strict JSON."""
    try:
        return pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as e:
        reason = str(e)
    where = reason.rpartition(" at ")[2]
    if "recursion limit" in reason:
        message = (f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels of "
                   "arrays and objects)")
    elif any(s in reason for s in _SURROGATE_ERRORS):
        message = (f"request body has a lone UTF-16 surrogate escape ({where}); strings must "
                   "be valid Unicode (\\ud800-\\udfff only as pairs)")
    else:
        message = f"request body is not valid JSON: {reason}"
    raise APIError(400, message, code="invalid_json")


def parse_body(model: type[_Model], data: Any) -> Any:
    """Validate a decoded JSON body; raise a 400 APIError naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        err = next((x for x in errors if x["type"] == "value_error"), errors[0])
        param = _param_of(tuple(err["loc"])) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"invalid value for {param!r}: {msg}" if param else msg,
                       param=param, code="invalid_value") from None


# ---- response shapes: documentation for /openapi.json (the routes build plain dicts) --------
# ``extra="forbid"`` makes each an exact description: a field the server adds without
# documenting it here fails the schemathesis run (tests/e2e/test_fuzz_openapi.py).

FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Response):
    """Every error: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


class PromptTokensDetails(_Response):
    cached_tokens: int  # prompt tokens whose KV was reused
    cache_write_tokens: int  # prompt tokens whose KV this request computed and cached


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(_Response):
    token: str
    logprob: float  # finite: a token the sampler had masked reports -9999.0
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob]


class FunctionCallOut(_Response):
    name: str
    arguments: str


class ToolCallOut(_Response):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(_Response):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(ToolCallOut):
    index: int


class ChatDelta(_Response):
    """What a chat chunk adds to its choice (each field only when it has something)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Response):
    """One event of a chat stream; with ``include_usage`` every chunk has ``usage`` (null but
    in the last, whose ``choices`` is empty)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobsOut(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobsOut | None
    finish_reason: FinishReason


class Completion(_Response):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobsOut | None
    finish_reason: FinishReason | None


class CompletionChunk(_Response):
    """One event of a text completion stream (``usage`` as in ChatCompletionChunk)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(_Response):
    object: Literal["list"]
    data: list[ModelCard]


class HealthStatus(_Response):
    status: Literal["ok", "starting", "unavailable"]

"""Pydantic models of the OpenAI request bodies Encore accepts (plus its extensions).

Unknown fields are ignored; a known field with a bad value is a 400 whose ``param`` names it
(:func:`parse_body`). Responses are built as plain dicts in ``server.responses``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.errors import APIError

MAX_N = 64
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16

NonNegInt = Annotated[int, Field(ge=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Model):
    include_usage: bool = False


class ContentPart(_Model):
    """A content part; only ``text`` parts are supported (cache breakpoints are accepted)."""

    type: str
    text: str | None = None
    prompt_cache_breakpoint: dict[str, Any] | None = None

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v != "text":
            raise ValueError("only 'text' content parts are supported")
        return v


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content)


class _CommonRequest(_Model):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    prompt_cache_options: dict[str, Any] | None = None
    job_id: str | None = Field(default=None, max_length=1024)
    is_last_step: bool | None = None
    # extensions
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    stop_token_ids: list[NonNegInt] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    priority: int = 0
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

    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def program_key(self) -> str | None:
        return self.prompt_cache_key or self.job_id


class ChatCompletionRequest(_CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

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
    best_of: int | None = Field(default=None, ge=1)

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

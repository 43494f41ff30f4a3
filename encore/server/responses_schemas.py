"""Pydantic models of ``/v1/responses``: the request Encore accepts and, for
``/openapi.json``, the response object, its stream events and the deletion answer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from encore.server.schemas import PositiveInt, _Model, _Response


class InputText(_Model):
    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(_Model):
    """A message of the conversation (``type`` may be omitted)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionCallItem(_Model):
    """A call the model made earlier (an output item sent back as input)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=64)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Model):
    """What a function call returned."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem


class FunctionTool(_Model):
    """A function tool, flat as in the Responses API; ``strict`` defaults to true there."""

    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Model):
    type: Literal["function"]
    name: str


class TextFormat(_Model):
    """``text.format``: ``text``, ``json_object``, or ``json_schema`` with its fields inline."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("type 'json_schema' needs 'name' and 'schema'")
        return self

    def json_schema_body(self) -> dict[str, Any] | None:
        return self.schema_


class TextConfig(_Model):
    format: TextFormat | None = None


class ResponsesRequest(_Model):
    """``POST /v1/responses``. Caching fields as in chat (docs/api.md)."""

    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    store: bool = True
    previous_response_id: str | None = Field(default=None, max_length=256)
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    session_id: str | None = Field(default=None, max_length=1024)
    cache_control: dict[str, Any] | None = None
    truncation: Literal["disabled"] | None = None  # "auto" is not supported (400)
    background: Literal[False] | None = None  # background mode is not supported (400)


# ---- responses (documentation for /openapi.json; the route builds plain dicts) -------------


class OutputText(_Response):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]


class OutputMessage(_Response):
    type: Literal["message"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[OutputText]


class OutputFunctionCall(_Response):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class InputTokensDetails(_Response):
    cached_tokens: int
    cache_write_tokens: int


class OutputTokensDetails(_Response):
    reasoning_tokens: int


class ResponseUsage(_Response):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(_Response):
    reason: Literal["max_output_tokens"]


class ResponseObject(_Response):
    """A response (``object: "response"``), as created, streamed, stored and read back."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    error: None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputMessage | OutputFunctionCall]
    parallel_tool_calls: bool
    previous_response_id: str | None
    store: bool
    temperature: float
    top_p: float
    text: dict[str, Any]
    tool_choice: Any
    tools: list[dict[str, Any]]
    truncation: Literal["disabled"]
    metadata: dict[str, str]
    user: str | None
    prompt_cache_key: str | None
    usage: ResponseUsage | None


class ResponseStreamEvent(BaseModel):
    """One event of a response stream: ``type`` (``response.created``,
    ``response.output_text.delta``, ...; see docs/api.md) and ``sequence_number``, with the
    fields OpenAI documents for that type."""

    model_config = ConfigDict(extra="allow")
    type: str
    sequence_number: int


class ResponseDeleted(_Response):
    id: str
    object: Literal["response.deleted"]
    deleted: Literal[True]

"""Tool calls in model output: parse them (whole text) or pick them out of a stream.

Two formats, chosen by ``ServerConfig.tool_call_parser``:

- ``hermes`` (Hermes / Qwen): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  once or several times; text outside the tags stays content.
- ``llama3_json``: the whole output is ``{"name": ..., "parameters"|"arguments": {...}}``,
  optionally after ``<|python_tag|>``.

A call whose JSON is malformed or whose name is not one of the request's tools is kept as plain
content: bad model output is never a server error.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
PARSERS = ("hermes", "llama3_json")


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; ``arguments`` is a JSON string, as the OpenAI API returns it."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_api(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedOutput:
    """Content outside the calls (``None`` when empty) and the calls, in order."""

    content: str | None
    tool_calls: list[ToolCall]


def _call_from_json(text: str, names: set[str]) -> ToolCall | None:
    """A ToolCall from one JSON object, or None if malformed or naming an unknown tool."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if obj["name"] not in names or not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _content(text: str) -> str | None:
    return text if text.strip() else None


def parse_hermes(text: str, names: set[str]) -> ParsedOutput:
    """Every well-formed ``<tool_call>`` block becomes a call; the rest is content."""
    calls: list[ToolCall] = []
    kept: list[str] = []
    rest = text
    while (start := rest.find(HERMES_OPEN)) != -1:
        end = rest.find(HERMES_CLOSE, start)
        if end == -1:
            break
        call = _call_from_json(rest[start + len(HERMES_OPEN):end].strip(), names)
        kept.append(rest[:start] if call else rest[:end + len(HERMES_CLOSE)])
        if call:
            calls.append(call)
        rest = rest[end + len(HERMES_CLOSE):]
    kept.append(rest)
    if not calls:
        return ParsedOutput(text, [])
    return ParsedOutput(_content("".join(kept)), calls)


def parse_llama3_json(text: str, names: set[str]) -> ParsedOutput:
    """The whole output (after an optional ``<|python_tag|>``) is one JSON call, or content."""
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    call = _call_from_json(body, names) if body.startswith("{") else None
    return ParsedOutput(None, [call]) if call else ParsedOutput(text, [])


def parse_tool_calls(parser: str, text: str, names: set[str]) -> ParsedOutput:
    if parser == "hermes":
        return parse_hermes(text, names)
    if parser == "llama3_json":
        return parse_llama3_json(text, names)
    raise ValueError(f"unknown tool_call_parser {parser!r}; expected one of {PARSERS}")


def _partial_suffix(text: str, token: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``token``."""
    for n in range(min(len(token) - 1, len(text)), 0, -1):
        if token.startswith(text[-n:]):
            return n
    return 0


class StreamingToolParser:
    """Splits streamed text into content to show now and completed tool calls.

    ``feed`` returns (content, calls) ready to send; text that may still become a call (a
    partial ``<tool_call>`` tag, an open call, or a llama3 JSON output) is held back until it
    is decided. ``finish`` releases what is left: a call never closed is content.
    """

    def __init__(self, parser: str, names: set[str]) -> None:
        if parser not in PARSERS:
            raise ValueError(f"unknown tool_call_parser {parser!r}; expected one of {PARSERS}")
        self.parser = parser
        self.names = names
        self._buf = ""
        self._json_mode: bool | None = None  # llama3: None until the first non-space char
        self.called: list[str] = []  # names of the calls parsed so far

    @property
    def num_calls(self) -> int:
        return len(self.called)

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buf += text
        if self.parser == "llama3_json":
            return self._feed_llama3()
        return self._feed_hermes()

    def _feed_hermes(self) -> tuple[str, list[ToolCall]]:
        out: list[str] = []
        calls: list[ToolCall] = []
        while True:
            start = self._buf.find(HERMES_OPEN)
            if start == -1:
                keep = _partial_suffix(self._buf, HERMES_OPEN)
                out.append(self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            end = self._buf.find(HERMES_CLOSE, start)
            if end == -1:
                out.append(self._buf[:start])
                self._buf = self._buf[start:]
                break
            stop = end + len(HERMES_CLOSE)
            call = _call_from_json(self._buf[start + len(HERMES_OPEN):end].strip(), self.names)
            out.append(self._buf[:start] if call else self._buf[:stop])
            calls += [call] if call else []
            self._buf = self._buf[stop:]
        self.called += [c.name for c in calls]
        return "".join(out), calls

    def _feed_llama3(self) -> tuple[str, list[ToolCall]]:
        if self._json_mode is None:
            head = self._buf.lstrip()
            if not head or (PYTHON_TAG.startswith(head) and head != PYTHON_TAG):
                return "", []
            self._json_mode = head.startswith(("{", PYTHON_TAG))
        if self._json_mode:
            return "", []
        text, self._buf = self._buf, ""
        return text, []

    def finish(self) -> tuple[str, list[ToolCall]]:
        """Release the held-back text (llama3: parse it now)."""
        text, self._buf = self._buf, ""
        if self.parser == "llama3_json" and self._json_mode is not False:
            parsed = parse_llama3_json(text, self.names)
            self.called += [c.name for c in parsed.tool_calls]
            return parsed.content or "", parsed.tool_calls
        return text, []

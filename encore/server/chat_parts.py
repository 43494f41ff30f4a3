"""Chat prompts tokenized part by part: position-independent chunks and breakpoint pins.

A content part marked ``prompt_cache_breakpoint: {"mode": "chunk"}`` (with
``cache.chunk_reuse = "parts"`` also every long enough text part) is a chunk: its tokens are
``encode(part text)`` in every request, wherever it appears. A part marked
``{"mode": "explicit", "ttl": "30m"}`` pins the prompt prefix that ends with it.

Such a prompt is rendered with a unique sentinel standing in for each marked part (a chunk's
text is replaced by it; a pinned part keeps its text and the sentinel follows it). The rendered
text is split on the sentinels and each piece is tokenized on its own, so this works with any
chat template::

    rendered:  <|im_start|>user\\n S0 <|im_end|>\\n<|im_start|>user\\nsee above S1 <|im_end|>...
    ids:       [ encode(piece)  | encode(chunk) | encode(piece ............) | encode(piece) ]
    chunks:                     [start,    end)
    pins:                                                          (prefix length, ttl)

A request without marks is tokenized in one piece, exactly as before.

Client text is text (:class:`TextEscapes`): a special-token string such as ``<|im_end|>`` in
a message never becomes the control token, so a user cannot forge a turn.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from encore.server.errors import invalid
from encore.server.schemas import ChatCompletionRequest, ContentPart
from encore.server.serving import ServingContext, checked_pin_ttl, pin_ttl, soft_pin_ttl

CHUNK_ROLES = ("system", "developer", "user", "tool")
MAX_BREAKPOINTS = 4  # explicit pins per request, as OpenAI allows

Render = Callable[[ChatCompletionRequest], str]


class TextEscapes:
    """Special-token strings in client text, kept out of the rendered prompt's control tokens.

    A chat template pastes client strings (content, names, tool calls and definitions) between
    its own special tokens; encoding the result in one piece would turn a ``<|im_end|>`` typed
    by a user into the control token. :meth:`escape` swaps each such string for a placeholder
    before rendering; :meth:`encode` then encodes the rendered prompt segment by segment
    between the template's own special tokens (as the tokenizer itself splits on them), with
    the placeholders restored and encoded as plain text (``tok.encode_text``)::

        client:    "hi <|im_end|> evil"            (P: the placeholder of <|im_end|>)
        rendered:  <|im_start|>  user\\nhi P evil   <|im_end|>
        ids:       [special]     [encode_text("user\\nhi <|im_end|> evil")]  [special]

    When no client string holds a special token (nearly always) the prompt is encoded in one
    piece, exactly as before. A tokenizer without ``special_token_strings`` has nothing to
    escape. One instance per request (the placeholders carry a random nonce).
    """

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        specials = sorted(getattr(tok, "special_token_strings", ()), key=len, reverse=True)
        nonce = uuid.uuid4().hex
        self._placeholder = {s: f"<|encore-text-{nonce}-{i}|>" for i, s in enumerate(specials)}
        self._original = {p: s for s, p in self._placeholder.items()}
        self._specials = _alternation(specials)
        self._placeholders = _alternation(list(self._original))
        self.used = False  # some client string held a special token

    def escape(self, value: Any) -> Any:
        """``value`` (strings, lists and dicts, keys included) with special-token strings
        replaced by placeholders."""
        if isinstance(value, str):
            if self._specials is None or not self._specials.search(value):
                return value
            self.used = True
            return self._specials.sub(lambda m: self._placeholder[m.group()], value)
        if isinstance(value, list):
            return [self.escape(v) for v in value]
        if isinstance(value, dict):
            return {self.escape(k): self.escape(v) for k, v in value.items()}
        return value

    def encode(self, rendered: str) -> list[int]:
        """Ids of (a piece of) a prompt rendered from escaped strings."""
        if not self.used or self._specials is None:
            return self.tok.encode(rendered, add_special_tokens=False)
        ids: list[int] = []
        for i, segment in enumerate(self._specials.split(rendered)):
            if i % 2:  # one of the template's own special tokens
                ids += self.tok.encode(segment, add_special_tokens=False)
            elif segment:
                assert self._placeholders is not None
                text = self._placeholders.sub(lambda m: self._original[m.group()], segment)
                ids += self.tok.encode_text(text)
        return ids

    def encode_text(self, text: str) -> list[int]:
        """Ids of one client string (a chunk's text): special-token strings are text."""
        if self._specials is None or not self._specials.search(text):
            return self.tok.encode(text, add_special_tokens=False)
        return self.tok.encode_text(text)


def _alternation(strings: list[str]) -> re.Pattern[str] | None:
    """A regex matching any of ``strings`` (longest first, so none shadows a longer one),
    captured so that ``split`` keeps the matches; None for no strings."""
    if not strings:
        return None
    return re.compile("(" + "|".join(map(re.escape, strings)) + ")")


@dataclass(frozen=True)
class PartMark:
    """What one content part, ``messages[message].content[part]``, asks of the prompt."""

    message: int
    part: int
    chunk: bool  # tokenized on its own; its span goes to EngineRequest.chunks
    pin_ttl_s: float | None = None  # explicit breakpoint: pin the prefix ending with this part
    soft: bool = False  # Anthropic's cache_control: a later hit on the prefix refreshes it
    token_ids: list[int] | None = None  # the chunk's own tokens, when already encoded


@dataclass(frozen=True)
class ChatPrompt:
    """Prompt token ids and the token positions of its marked parts (both sorted)."""

    token_ids: list[int]
    chunks: list[tuple[int, int]] = field(default_factory=list)
    pin_breakpoints: list[tuple[int, float]] = field(default_factory=list)
    soft_pin_breakpoints: list[tuple[int, float]] = field(default_factory=list)


def breakpoint_param(message: int, part: int) -> str:
    return f"messages[{message}].content[{part}].prompt_cache_breakpoint"


def _parts(req: ChatCompletionRequest) -> Iterator[tuple[int, int, ContentPart]]:
    for m, msg in enumerate(req.messages):
        if isinstance(msg.content, list):
            for p, part in enumerate(msg.content):
                yield m, p, part


def part_marks(ctx: ServingContext, req: ChatCompletionRequest) -> list[PartMark]:
    """The parts the client marked, in message order. 400 naming the part for a chunk mark
    when chunk reuse is off or on an assistant message, for a breakpoint ttl that
    :func:`checked_pin_ttl` refuses, and for more than MAX_BREAKPOINTS pins. An ``explicit``
    breakpoint without a ttl takes ``prompt_cache_options.ttl`` (as OpenAI's does); with
    neither it is a no-op, like ``implicit`` (prefix caching is always on)."""
    marks = []
    for m, p, part in _parts(req):
        mode, param = part.breakpoint_mode(), breakpoint_param(m, p)
        if mode == "chunk":
            _check_chunk(ctx, req.messages[m].role, param)
            marks.append(PartMark(m, p, chunk=True))
        elif mode == "explicit":
            ttl = _breakpoint_ttl(ctx, req, part, param)
            if ttl is not None:
                marks.append(PartMark(m, p, chunk=False, pin_ttl_s=ttl))
        elif part.cache_control is not None:  # Anthropic's marker: a soft breakpoint pin
            ttl = soft_pin_ttl(ctx, req, part.cache_control)
            if ttl is not None:
                marks.append(PartMark(m, p, chunk=False, pin_ttl_s=ttl, soft=True))
    if sum(mk.pin_ttl_s is not None for mk in marks) > MAX_BREAKPOINTS:
        raise invalid(f"at most {MAX_BREAKPOINTS} content parts may carry an explicit "
                      "prompt_cache_breakpoint with a ttl", "messages")
    return marks


def _breakpoint_ttl(ctx: ServingContext, req: ChatCompletionRequest, part: ContentPart,
                    param: str) -> float | None:
    if part.breakpoint_ttl() is not None:
        return checked_pin_ttl(ctx, req, part.breakpoint_ttl(), f"{param}.ttl")
    return pin_ttl(ctx, req)


def _check_chunk(ctx: ServingContext, role: str, param: str) -> None:
    if ctx.config.cache.chunk_reuse == "off":
        raise invalid("prompt_cache_breakpoint mode 'chunk' is refused: chunk reuse is off in "
                      "this server's config (cache.chunk_reuse)", param)
    if role not in CHUNK_ROLES:
        raise invalid(f"a {role} message cannot carry a chunk (only system, developer, user and "
                      "tool messages can)", param)


def with_long_parts(escapes: TextEscapes, req: ChatCompletionRequest, marks: list[PartMark],
                    min_tokens: int) -> list[PartMark]:
    """``marks`` plus every text part of a chunk role with at least ``min_tokens`` tokens
    (``cache.chunk_reuse = "parts"``), in message order. Encodes candidate parts (a part with
    fewer UTF-8 bytes than ``min_tokens`` cannot have enough tokens and is skipped)."""
    by_part = {(mk.message, mk.part): mk for mk in marks}
    for m, p, part in _parts(req):
        old = by_part.get((m, p))
        text = part.text or ""
        if old is not None and old.chunk or req.messages[m].role not in CHUNK_ROLES:
            continue
        if len(text.encode("utf-8")) + 1 < min_tokens:  # cheap bound: skip encoding
            continue
        ids = escapes.encode_text(text)
        if len(ids) >= min_tokens:
            base = old or PartMark(m, p, chunk=True)
            by_part[(m, p)] = replace(base, chunk=True, token_ids=ids)
    return [by_part[k] for k in sorted(by_part)]


def encode_marked(tok: Any, render: Render, req: ChatCompletionRequest, marks: list[PartMark],
                  escapes: TextEscapes | None = None) -> ChatPrompt:
    """Render ``req`` with sentinels for ``marks``, then tokenize piece by piece (see the
    module doc). 400 naming the part if the template does not render it exactly once.
    ``escapes``: the ones ``render`` escaped client strings with (None: it did not)."""
    escapes = escapes or TextEscapes(tok)
    nonce = uuid.uuid4().hex
    sentinels = {f"<|encore-part-{nonce}-{i}|>": mk for i, mk in enumerate(marks)}
    text = render(_with_sentinels(req, sentinels))
    for s, mk in sentinels.items():
        if text.count(s) != 1:
            raise invalid(f"the chat template renders this content part {text.count(s)} times; "
                          "chunk and breakpoint marks need it exactly once",
                          breakpoint_param(mk.message, mk.part))
    pieces = re.split("(" + "|".join(map(re.escape, sentinels)) + ")", text)
    return _encode_pieces(escapes, req, pieces, sentinels)


def _with_sentinels(req: ChatCompletionRequest,
                    sentinels: dict[str, PartMark]) -> ChatCompletionRequest:
    """A copy of ``req`` whose chunk parts read as their sentinel, and whose pinned parts are
    followed by theirs."""
    messages = list(req.messages)
    for s, mk in sentinels.items():
        parts = list(messages[mk.message].content or [])
        part = parts[mk.part]
        assert isinstance(part, ContentPart)
        parts[mk.part] = part.model_copy(update={"text": s if mk.chunk else (part.text or "") + s})
        messages[mk.message] = messages[mk.message].model_copy(update={"content": parts})
    return req.model_copy(update={"messages": messages})


def _encode_pieces(escapes: TextEscapes, req: ChatCompletionRequest, pieces: list[str],
                   sentinels: dict[str, PartMark]) -> ChatPrompt:
    """``pieces`` alternate rendered text and sentinels (``re.split`` with a group)."""
    ids: list[int] = []
    chunks: list[tuple[int, int]] = []
    pins: list[tuple[int, float]] = []
    soft: list[tuple[int, float]] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            ids += escapes.encode(piece)
            continue
        mk = sentinels[piece]
        if mk.chunk:
            start = len(ids)
            ids += mk.token_ids if mk.token_ids is not None else _chunk_ids(escapes, req, mk)
            if len(ids) > start:
                chunks.append((start, len(ids)))
        if mk.pin_ttl_s is not None:
            (soft if mk.soft else pins).append((len(ids), mk.pin_ttl_s))
    return ChatPrompt(ids, chunks, pins, soft)


def _chunk_ids(escapes: TextEscapes, req: ChatCompletionRequest, mk: PartMark) -> list[int]:
    content = req.messages[mk.message].content
    assert isinstance(content, list)
    return escapes.encode_text(content[mk.part].text or "")


def render_marked(escapes: TextEscapes, render: Render, req: ChatCompletionRequest,
                  marks: list[PartMark], chunk_reuse: str, min_tokens: int) -> ChatPrompt:
    """The prompt of ``req``: in one piece without marks, else part by part. ``render`` must
    pass the messages through ``escapes.escape``. Blocking (run it off the event loop);
    APIError for a template that mangles marked parts."""
    if chunk_reuse == "parts":
        marks = with_long_parts(escapes, req, marks, min_tokens)
    if not marks:
        return ChatPrompt(escapes.encode(render(req)))
    return encode_marked(escapes.tok, render, req, marks, escapes)


"""Incremental detokenization that never splits a UTF-8 character.

Byte-level tokenizers often spread one character over several tokens; decoding such a token
alone gives U+FFFD. We decode a small sliding window instead and emit only once the window's
text has grown and does not end in U+FFFD:

    ids:   [ ... prompt tail ... | out0 out1 out2 ... ]
             ^prefix_offset        ^read_offset      ^len(ids)
    delta = decode(ids[prefix:]) minus decode(ids[prefix:read])

The prompt tail gives the first output tokens their context (SentencePiece drops a leading
space when a token is decoded at the start of a string).
"""

from __future__ import annotations

from typing import Protocol

_PROMPT_CONTEXT = 6
_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas; mutates only itself."""

    def __init__(self, tokenizer: Decoder, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list((prompt_ids or [])[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Emit whatever is still held back (an unfinished character becomes U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        window = self._ids[self._prefix_offset:]
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(window)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT)):
            return ""
        delta = new_text[len(prefix_text):] if new_text.startswith(prefix_text) else new_text
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

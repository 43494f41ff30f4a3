"""The grammar engine: llguidance, chosen over xgrammar by measurement (docs/benchmarks.md,
"Grammar engine"): it compiles a JSON schema 5-10x faster on this CPU, and it does not import
torch, which P1 (where grammars are compiled and matched) must never do.

    GrammarSpec ──check_grammar (P0: 400 naming what is wrong)
         │
         └─compile_grammar(vocab, spec) (P1, on a pool thread) ─► CompiledGrammar
                                                                      │ .matcher() per sequence
    each step: fill_bitmask([matcher…]) ─► packed int32 rows ─► the worker masks the logits
    each sampled token: matcher.accept(token); matcher.stopped ends the sequence ("stop")

JSON is generated compact (no optional whitespace: ``{"a":1}``), so that a model cannot spend
its whole budget on blanks; the result is still what ``json.loads`` and the schema accept.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import llguidance
import numpy as np

from encore.protocol.messages import GrammarSpec

# compact JSON (see the module docstring); unknown keywords are errors, never ignored
_JSON_OPTIONS: Any = {"whitespace_flexible": False, "lenient": False}
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)
_MAX_MESSAGE = 300
T = TypeVar("T")
# llguidance's wording for a schema keyword or format it does not implement
_UNSUPPORTED = ("Unimplemented", "Unknown format", "not supported", "unsupported")


class GrammarError(ValueError):
    """A grammar that cannot be used: ``unsupported`` (a feature the engine lacks) or not."""

    def __init__(self, message: str, unsupported: bool) -> None:
        super().__init__(message)
        self.unsupported = unsupported


def bitmask_words(vocab_size: int) -> int:
    """int32 words of one token bitmask row."""
    return (vocab_size + 31) // 32


def _grammar_text(spec: GrammarSpec) -> str:
    """llguidance's grammar for ``spec`` (no validation)."""
    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}',
                                                             overrides=_JSON_OPTIONS)
    if spec.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(spec.spec, overrides=_JSON_OPTIONS)
    return llguidance.LLMatcher.grammar_from_lark(spec.spec)


def _error(message: str) -> GrammarError:
    message = message.strip().splitlines()[0] if message.strip() else "invalid grammar"
    return GrammarError(message[:_MAX_MESSAGE],
                        unsupported=any(s in message for s in _UNSUPPORTED))


def _engine_call(fn: Callable[[], T]) -> T:
    """``fn()``; whatever the engine raises for a grammar it cannot use is a GrammarError (a
    Rust panic surfaces as pyo3's PanicException, a BaseException)."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - see the docstring
        raise _error(str(e)) from None


def check_grammar(spec: GrammarSpec) -> None:
    """Raise GrammarError if ``spec`` is malformed or uses what the engine does not support
    (no vocabulary needed: P0 calls this before a request reaches the engine)."""
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.spec)
        except ValueError as e:
            raise GrammarError(f"the schema is not JSON: {e}", unsupported=False) from None
        if not isinstance(schema, dict | bool):
            raise GrammarError("a JSON schema must be an object", unsupported=False)
    is_error, messages = _engine_call(
        lambda: llguidance.LLMatcher.validate_grammar_with_warnings(
            _grammar_text(spec), None, limits=_LIMITS))
    if is_error:
        raise _error(messages[0] if messages else "invalid grammar")


class Vocab:
    """The model's vocabulary as the grammar engine sees it: built once (about 0.2 s for a
    49k-token vocabulary) from a Hugging Face ``tokenizer.json`` string and the model's
    logits width ``vocab_size`` (a mask covers the larger of it and the tokenizer's size)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = list(eos_token_ids)
        tok = llguidance.LLTokenizer(tokenizer_json, eos_token=self.eos_token_ids)
        if tok.vocab_size < vocab_size:  # the model pads its embedding past the tokenizer
            tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                                         eos_token=self.eos_token_ids)
        self._tok = tok
        self.vocab_size = tok.vocab_size  # mask rows cover it; the sampler cuts to the logits
        self.words = bitmask_words(tok.vocab_size)


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._m = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False if the grammar does not allow it."""
        return self._m.consume_token(token_id)

    @property
    def stopped(self) -> bool:
        """The grammar is complete: nothing but end-of-sequence may follow."""
        return self._m.is_stopped()

    @property
    def error(self) -> str | None:
        return self._m.get_error() or None if self._m.is_error() else None


@dataclass(frozen=True)
class CompiledGrammar:
    """A grammar compiled against a vocabulary; hands out fresh matchers."""

    spec: GrammarSpec
    _template: llguidance.LLMatcher

    def matcher(self) -> Matcher:
        return Matcher(self._template.deep_copy())


def compile_grammar(vocab: Vocab, spec: GrammarSpec) -> CompiledGrammar:
    """Compile ``spec`` for ``vocab`` (blocking, GIL released: run it on a pool thread).
    Raises GrammarError."""
    template = _engine_call(
        lambda: llguidance.LLMatcher(vocab._tok, _grammar_text(spec), limits=_LIMITS))
    if template.is_error():
        raise _error(template.get_error())
    return CompiledGrammar(spec, template)


_executor: llguidance.LLExecutor | None = None


def fill_bitmask(matchers: list[Matcher], words: int) -> bytes:
    """The next-token bitmasks of ``matchers``, one row of ``words`` little-endian int32 words
    each (bit t set: token t allowed), computed in parallel on llguidance's threads."""
    global _executor
    rows = np.empty((len(matchers), words), dtype="<i4")
    if len(matchers) == 1:
        m = matchers[0]._m
        m.unsafe_compute_mask_ptr(rows.ctypes.data, rows.nbytes)
    else:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        _executor.unsafe_compute_mask_ptr([(m._m, i) for i, m in enumerate(matchers)],
                                          rows.ctypes.data, words * 4, len(matchers))
    return rows.tobytes()

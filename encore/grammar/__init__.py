"""Constrained decoding's grammar engine behind one small interface (llguidance; torch-free).

P0 checks a request's grammar (:func:`check_grammar`), P1 compiles it against the model's
vocabulary (:class:`Vocab`, :func:`compile_grammar`) and keeps one :class:`Matcher` per
sequence, whose next-token masks it packs into each step (:func:`fill_bitmask`).
"""

from encore.grammar.engine import (
    CompiledGrammar,
    GrammarError,
    Matcher,
    Vocab,
    bitmask_words,
    check_grammar,
    compile_grammar,
    fill_bitmask,
)

__all__ = ["CompiledGrammar", "GrammarError", "Matcher", "Vocab", "bitmask_words",
           "check_grammar", "compile_grammar", "fill_bitmask"]

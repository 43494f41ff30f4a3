"""Compare the two grammar engines on this machine: xgrammar vs llguidance.

    .venv/bin/python bench/grammar_engines.py [--steps 64] [--batch 32]

For the embedded SmolLM2-135M tokenizer (49,152 tokens), per engine: the one-off cost of
building its tokenizer view, the compile time of a few JSON schemas (cold; and a warm
second compile where the engine caches), and the per-step cost of computing the next-token
bitmask for one sequence and for a batch (``--batch`` matchers of the same schema), with
the matchers advanced along a valid JSON document. Needs both packages installed (Encore
depends on llguidance only; ``pip install xgrammar`` to run this).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

SCHEMAS = {
    "flat": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"}}, "required": ["name", "age", "email"],
        "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "id": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
            "role": {"enum": ["admin", "user", "guest"]}},
            "required": ["id", "tags", "role"], "additionalProperties": False},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "extra": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["user", "score", "extra"], "additionalProperties": False},
    "json_object": {"type": "object"},
}
DOC = {"user": {"id": 42, "tags": ["a", "bb", "ccc"], "role": "admin"}, "score": 0.5,
       "extra": None}


def smollm2_tokenizer():
    from encore.configs.model_source import default_gguf_path
    from encore.server.tokenizer import load_tokenizer

    return load_tokenizer(str(default_gguf_path()))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def bench_llguidance(tok, steps: int, batch: int) -> dict:
    import llguidance
    import llguidance.numpy as lnp

    t = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok._tok.to_str(), n_vocab=tok.vocab_size,
                                   eos_token=tok.eos_token_ids)
    out = {"tokenizer": time.perf_counter() - t}
    for name, schema in SCHEMAS.items():
        t = time.perf_counter()
        g = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        m = llguidance.LLMatcher(lltok, g)
        assert not m.is_error(), m.get_error()
        out[f"compile {name}"] = time.perf_counter() - t
    g = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMAS["nested"]))
    ids = tok.encode(json.dumps(DOC))[:steps]
    mask = lnp.allocate_token_bitmask(batch, tok.vocab_size)
    one, par = [], []
    m = llguidance.LLMatcher(lltok, g)
    for t_id in ids:
        t = time.perf_counter()
        lnp.fill_next_token_bitmask(m, mask, 0)
        one.append(time.perf_counter() - t)
        assert m.consume_token(t_id), m.get_error()
    ex = llguidance.LLExecutor()
    ms_ = [llguidance.LLMatcher(lltok, g) for _ in range(batch)]
    for t_id in ids:
        t = time.perf_counter()
        lnp.fill_next_token_bitmask_par(ex, [(x, i) for i, x in enumerate(ms_)], mask)
        par.append(time.perf_counter() - t)
        for x in ms_:
            x.consume_token(t_id)
    return {**out, **_mask_stats(one, par, batch)}


def bench_xgrammar(tok, steps: int, batch: int) -> dict:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    t = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok._tok, eos_token=tok.eos_token)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tok.vocab_size,
                                              stop_token_ids=tok.eos_token_ids)
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    out = {"tokenizer": time.perf_counter() - t}
    for name, schema in SCHEMAS.items():
        t = time.perf_counter()
        if name == "json_object":
            compiler.compile_builtin_json_grammar()
        else:
            compiler.compile_json_schema(json.dumps(schema))
        out[f"compile {name}"] = time.perf_counter() - t
    ctx = compiler.compile_json_schema(json.dumps(SCHEMAS["nested"]))
    ids = tok.encode(json.dumps(DOC))[:steps]
    mask = xgr.allocate_token_bitmask(batch, tok.vocab_size)
    one, par = [], []
    m = xgr.GrammarMatcher(ctx)
    for t_id in ids:
        t = time.perf_counter()
        m.fill_next_token_bitmask(mask, 0)
        one.append(time.perf_counter() - t)
        assert m.accept_token(t_id)
    ms_ = [xgr.GrammarMatcher(ctx) for _ in range(batch)]
    for t_id in ids:
        t = time.perf_counter()
        for i, x in enumerate(ms_):
            x.fill_next_token_bitmask(mask, i)
        par.append(time.perf_counter() - t)
        for x in ms_:
            x.accept_token(t_id)
    return {**out, **_mask_stats(one, par, batch)}


def _mask_stats(one: list[float], par: list[float], batch: int) -> dict:
    return {"mask, 1 seq: first step": one[0], "mask, 1 seq: median": statistics.median(one),
            "mask, 1 seq: mean": statistics.mean(one), "mask, 1 seq: max": max(one),
            f"mask, {batch} seqs: first step": par[0],
            f"mask, {batch} seqs: median": statistics.median(par),
            f"mask, {batch} seqs: mean": statistics.mean(par)}


def bench_apply(vocab: int, batch: int) -> dict:
    """The sampler side (the same for both): unpack an int32 bitmask and mask the logits."""
    import torch

    from encore.worker.sampler import apply_token_bitmask

    logits = torch.randn(batch, vocab)
    mask = torch.from_numpy(np.full((batch, (vocab + 31) // 32), 0x0F0F0F0F, dtype=np.int32))
    times = []
    for _ in range(20):
        t = time.perf_counter()
        apply_token_bitmask(logits, mask)
        times.append(time.perf_counter() - t)
    return {f"apply bitmask to [{batch}, {vocab}] logits (median)": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    tok = smollm2_tokenizer()
    print(f"SmolLM2-135M tokenizer, vocab {tok.vocab_size}")
    for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        for key, value in fn(tok, args.steps, args.batch).items():
            print(f"{name:11s} {key:28s} {ms(value)}")
    for key, value in bench_apply(tok.vocab_size, args.batch).items():
        print(f"sampler     {key:28s} {ms(value)}")


if __name__ == "__main__":
    main()

"""Answer quality of chunk reuse (CacheBlend) on real RAG data: full prefill vs blending.

    python bench/rag_quality.py --limit 20                      # SmolLM2 on the CPU
    python bench/rag_quality.py --data my.json --json out.json

Each question comes with 10 passages (MuSiQue, ``../shared/data/musique_rag_dev.json``; any
file in the same schema works). The prompt is one chat user message whose content parts are
an instruction, the passages (each a chunk, tokenized on its own as the server does for
``prompt_cache_breakpoint: {"mode": "chunk"}``) in an order shuffled per question with a fixed
seed, and the question. Modes, all greedy:

    full       the plain prompt, prefilled in full (no chunks)
    naive      chunks reused as stored: no chunk token recomputed in any layer (a second
               engine with chunk_check_layer -1)
    blend_5/15/30   fixed recompute fractions (CacheBlend)
    adaptive   the adaptive policy (Cache-Craft style; runs last, once chunks are measured)
    tier       with ``--tier-kv-codec int8|int4``: the plain prompt with its prefix loaded
               from a host tier holding it at that codec (a third engine: the prompt runs
               once, a filler prompt pushes it out of the device pool into host, it runs again)
    kv8        with ``--kv-cache-dtype fp8_e4m3|fp8_e5m2``: the plain prompt, prefilled in
               full, on an engine whose device KV is fp8 (a fourth engine)
``--modes full,tier`` runs only those (full always runs: it is the reference).

Scores: answer F1 against the gold answers (SQuAD-style token F1, best over answers);
agreement with the full-prefill answer (normalized exact match) and F1 against it; and, for
the first answer token, whether its top-1 equals full prefill's ("top1") and the absolute
error of full prefill's top token's logprob ("lp err", -20 when outside the top 20). The engine
runs in-process (as ``bench/offline.py``). Prints one table last.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import string
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import add_engine_args, engine_overrides  # noqa: E402
from encore.configs.loading import build_config  # noqa: E402
from encore.protocol.messages import EngineRequest, SamplingParams  # noqa: E402
from encore.scheduler.engine import EngineCore  # noqa: E402
from encore.server.chat_parts import ChatPrompt, PartMark, encode_marked  # noqa: E402
from encore.server.chat_tools import render_messages  # noqa: E402
from encore.server.schemas import ChatCompletionRequest  # noqa: E402
from encore.server.tokenizer import load_tokenizer  # noqa: E402
from encore.worker.executor import InprocExecutor  # noqa: E402
from encore.worker.loader import default_gguf_path  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                            "data", "musique_rag_dev.json")
INSTRUCTION = ("You will be asked a question after reading several passages. Answer the "
               "question directly based on the given passages, in at most 5 words.\n"
               "Passages:\n")
TOP_LOGPROBS = 20
TIER_BLOCK = 16  # the tier engine's block size (its pool is sized in blocks)
LOGPROB_FLOOR = -20.0  # a token outside a mode's top logprobs counts as this
MODES = {"full": None, "naive": 0.0, "blend_5": 0.05, "blend_15": 0.15, "blend_30": 0.30,
         "adaptive": "adaptive"}


# ---------------------------------------------------------------------------- scoring
def normalize(text: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: str, truth: str) -> float:
    pred, gold = normalize(prediction).split(), normalize(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def best_f1(prediction: str, answers: list[str]) -> float:
    return max((f1(prediction, a) for a in answers), default=0.0)


# ---------------------------------------------------------------------------- prompts
def build_prompt(tok, item: dict, seed: int) -> ChatPrompt:
    """The chat prompt with every passage a chunk, passages shuffled by ``seed``."""
    passages = [c["text"].strip() + "\n\n" for c in item["ctxs"]]
    random.Random(seed).shuffle(passages)
    parts = [{"type": "text", "text": INSTRUCTION}]
    parts += [{"type": "text", "text": p} for p in passages]
    parts.append({"type": "text", "text": f"Question: {item['question']}\nAnswer:"})
    req = ChatCompletionRequest(model="bench", messages=[{"role": "user", "content": parts}])
    marks = [PartMark(0, i, chunk=True) for i in range(1, len(passages) + 1)]

    def render(r: ChatCompletionRequest) -> str:
        messages, _ = render_messages(r, native=False)
        return tok.apply_chat_template(messages, add_generation_prompt=True)

    return encode_marked(tok, render, req, marks)


# ---------------------------------------------------------------------------- engine
@dataclass
class Answer:
    text: str
    ttft_s: float
    first: dict[int, float]  # the first answer token's top logprobs (token id -> logprob)


def answer(cores: dict[str, EngineCore], tok, prompt: ChatPrompt, mode: str, rid: str,
           max_tokens: int) -> Answer:
    """The answer of one mode: its first line, time to the first token, first-token logprobs."""
    if mode == "tier":
        return tier_answer(cores["tier"], tok, prompt, rid, max_tokens)
    core = cores[mode if mode in ("naive", "kv8") else "main"]
    fraction = MODES.get(mode)
    chunks = [] if fraction is None else prompt.chunks
    recompute = fraction if isinstance(fraction, float) else None
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=TOP_LOGPROBS)
    # the full prefill gets its own cache salt: its prefix blocks must not serve the blended
    # modes of the same prompt (blended blocks are never prefix-registered themselves)
    salt = "full-prefill" if fraction is None else None
    req = EngineRequest(rid, prompt.token_ids, params, time.time(), eos_token_ids=tok.eos_token_ids,
                        chunks=chunks, chunk_recompute=recompute, cache_salt=salt)
    return generate(core, tok, req)


def tier_answer(core: EngineCore, tok, prompt: ChatPrompt, rid: str, max_tokens: int) -> Answer:
    """The plain prompt, run once, pushed out of the tier engine's device pool (into its host
    tier, encoded) by a filler prompt of random tokens as long as the pool, then run again
    (the answer returned) with its prefix loaded from host."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=TOP_LOGPROBS)
    pool = core.scheduler.kv.pool.num_usable
    rng = random.Random(len(prompt.token_ids))
    assert core.worker is not None
    vocab = min(core.worker.vocab_size, 32000)
    filler = [rng.randrange(100, vocab) for _ in range(pool * TIER_BLOCK - 1)]
    for name, ids in (("cold", prompt.token_ids), ("filler", filler)):
        generate(core, tok, EngineRequest(f"{rid}-{name}", ids, SamplingParams(
            temperature=0.0, max_tokens=1), time.time(), eos_token_ids=tok.eos_token_ids))
    return generate(core, tok, EngineRequest(rid, prompt.token_ids, params, time.time(),
                                             eos_token_ids=tok.eos_token_ids))


def generate(core: EngineCore, tok, req: EngineRequest) -> Answer:
    """Run one request to its end."""
    start = time.perf_counter()
    errors = core.add_request(req)
    if errors:
        raise SystemExit(f"request refused: {errors[0].error}")
    ids: list[int] = []
    ttft, first = 0.0, {}
    while core.has_work():
        for out in core.step():
            if out.error:
                raise SystemExit(f"request failed: {out.error}")
            if out.new_token_ids and not ids:
                ttft = time.perf_counter() - start
                if out.logprobs:
                    first = {t.token_id: t.logprob for t in out.logprobs[0].top}
            ids += out.new_token_ids
    return Answer(tok.decode(ids).split("\n")[0].strip(), ttft, first)


def run(args) -> dict:
    with open(args.data) as f:
        data = json.load(f)[:args.limit]
    tok = load_tokenizer(args.tokenizer or str(default_gguf_path()))
    overrides = engine_overrides(args, chunk_recompute_policy="adaptive",
                                 chunk_recompute_fraction=0.15,
                                 chunk_check_layer=args.check_layer)
    prompts = [build_prompt(tok, item, args.seed + i) for i, item in enumerate(data)]
    wanted = set(MODES) if args.modes in (None, "all") else set(args.modes.split(","))
    modes = ["full", *(m for m in MODES if m != "full" and m in wanted)]
    engines: list[tuple[str, dict]] = [("main", {})]
    if "naive" in modes:
        engines.append(("naive", {"chunk_check_layer": -1}))
    if args.kv_cache_dtype:
        engines.append(("kv8", {"kv_cache_dtype": args.kv_cache_dtype}))
        modes.append("kv8")
    if args.tier_kv_codec:
        engines.append(("tier", tier_overrides(args, prompts)))
        modes.append("tier")
    cores = {}
    for name, extra in engines:
        config = build_config(overrides={**overrides, **extra})
        cores[name] = EngineCore(config, InprocExecutor(config))
        cores[name].start()
    results: dict[str, dict[str, list[float]]] = {
        m: {"f1": [], "agree": [], "f1_vs_full": [], "top1": [], "lp_err": [], "ttft_s": []}
        for m in modes}
    for i, (item, prompt) in enumerate(zip(data, prompts, strict=True)):
        line = []
        full = answer(cores, tok, prompt, "full", f"q{i}-full", args.max_tokens)
        top = max(full.first, key=full.first.__getitem__)
        for mode in modes:
            a = full if mode == "full" else answer(cores, tok, prompt, mode, f"q{i}-{mode}",
                                                    args.max_tokens)
            r = results[mode]
            r["f1"].append(best_f1(a.text, item["answers"]))
            r["agree"].append(float(normalize(a.text) == normalize(full.text)))
            r["f1_vs_full"].append(f1(a.text, full.text))
            r["top1"].append(float(max(a.first, key=a.first.__getitem__) == top))
            r["lp_err"].append(abs(a.first.get(top, LOGPROB_FLOOR) - full.first[top]))
            r["ttft_s"].append(a.ttft_s)
            line.append(f"{mode}={a.text[:24]!r}")
        print(f"[{i + 1}/{len(data)}] {len(prompt.token_ids)} tokens, gold "
              f"{item['answers'][0][:24]!r}: " + " ".join(line), flush=True)
    stats = cores["main"].scheduler.stats().values
    summary = {m: {k: sum(v) / len(v) for k, v in r.items()} for m, r in results.items()}
    out = {"modes": summary, "questions": len(data), "data": os.path.abspath(args.data),
           "chunk_hit_tokens": stats.get("chunk_hit_tokens", 0),
           "chunk_recomputed_tokens": stats.get("chunk_recomputed_tokens", 0)}
    if "tier" in cores:  # how much of the tier mode's prompts came from host
        hits = cores["tier"].scheduler.stats().labeled.get("kv_tier_hit_tokens", {})
        out["tier"] = {"codec": args.tier_kv_codec, "host_hit_tokens": hits.get("host", 0)}
    return out


def tier_overrides(args, prompts: list[ChatPrompt]) -> dict:
    """The tier engine: a device pool just over the longest prompt (so that a filler as long
    evicts it), a host tier at ``--tier-kv-codec``, every hit loaded."""
    longest = max(len(p.token_ids) for p in prompts) + args.max_tokens
    return {"tier_kv_codec": args.tier_kv_codec, "host_cache_gib": args.tier_host_gib,
            "num_device_blocks": -(-longest // TIER_BLOCK) + 3, "block_size": TIER_BLOCK,
            "kv_load_policy": "always", "max_num_seqs": 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--limit", type=int, default=20, help="questions to run")
    p.add_argument("--seed", type=int, default=0, help="passage shuffle seed (per question +i)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--check-layer", type=int, default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--tier-kv-codec", default=None, choices=["none", "int8", "int4"],
                   help="add the tier mode: the prefix loaded from a host tier at this codec")
    p.add_argument("--tier-host-gib", type=float, default=2.0,
                   help="the tier mode's host tier (GiB)")
    p.add_argument("--kv-cache-dtype", default=None, choices=["fp8_e4m3", "fp8_e5m2"],
                   help="add the kv8 mode: full prefill on an fp8 device KV pool")
    p.add_argument("--modes", default=None, help="comma-separated modes of " + ",".join(MODES)
                   + " to run (default: all); full always runs")
    add_engine_args(p)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    out = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print(f"\n{out['questions']} questions; F1 vs gold answers, agreement with full prefill")
    print(f"{'mode':<10} {'F1':>6} {'agree':>6} {'F1~full':>8} {'top1':>5} {'lp err':>7} "
          f"{'TTFT s':>7}")
    for mode, s in out["modes"].items():
        print(f"{mode:<10} {s['f1']:>6.3f} {s['agree']:>6.2f} {s['f1_vs_full']:>8.3f} "
              f"{s['top1']:>5.2f} {s['lp_err']:>7.3f} {s['ttft_s']:>7.2f}")


if __name__ == "__main__":
    main()

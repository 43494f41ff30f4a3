"""Structured outputs: decode throughput with a JSON schema vs unconstrained, and TTFT with a
cached vs an uncached schema.

    python bench/structured.py                                 # SmolLM2 GGUF on this CPU
    python bench/structured.py --load-format dummy --model llama-3-8b --device cuda \\
        --max-num-seqs 64                                       # GPU shape (SmolLM2 tokenizer)

Runs the real engine in-process (scheduler + model runner, no HTTP), stepped synchronously in
this thread, as bench/offline.py does. Grammars compile on the engine's pool and are masked
by the sampler exactly as in the server. The schema (an array of at least 10,000 small
objects) cannot complete within ``--output-len`` tokens, so every constrained sequence
decodes the same number of tokens as an unconstrained one; greedy, ignore_eos.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import add_engine_args, engine_overrides  # noqa: E402
from encore.configs.loading import build_config  # noqa: E402
from encore.configs.model_source import default_gguf_path  # noqa: E402
from encore.protocol.messages import (  # noqa: E402
    EngineRequest,
    GrammarSpec,
    GrammarVocab,
    SamplingParams,
)
from encore.scheduler.engine import EngineCore  # noqa: E402
from encore.server.tokenizer import load_tokenizer  # noqa: E402
from encore.worker.executor import InprocExecutor  # noqa: E402


def schema(tag: str = "item") -> GrammarSpec:
    """An array of small objects that cannot end within the run (``tag`` names a property,
    so a new tag is a new, uncached schema)."""
    item = {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 100000},
        tag: {"type": "string", "maxLength": 8},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
        "score": {"type": "number"}}, "required": ["id", tag, "kind", "score"],
        "additionalProperties": False}
    return GrammarSpec("json_schema", json.dumps({"type": "array", "items": item,
                                                  "minItems": 10000}))


def run(core: EngineCore, prompts: list[list[int]], output_len: int,
        grammar: GrammarSpec | None) -> dict:
    """Submit all prompts at once and step until done: tokens/s and TTFTs."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    stamps: dict[str, list[float]] = {}
    for prompt in prompts:
        rid = f"bench-{uuid.uuid4().hex}"
        stamps[rid] = []
        core.add_request(EngineRequest(request_id=rid, prompt_token_ids=prompt, sampling=params,
                                       arrival_time=time.time(), grammar=grammar))
    while core.has_work():
        for out in core.step():
            assert out.finish_reason != "error", out.error
            stamps[out.request_id].extend(time.perf_counter() for _ in out.new_token_ids)
    wall = time.perf_counter() - start
    tokens = sum(len(s) for s in stamps.values())
    return {"tok_s": tokens / wall, "tokens": tokens,
            "ttft_s": [s[0] - start for s in stamps.values()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    add_engine_args(ap, max_num_seqs=32)
    ap.add_argument("--tokenizer", default=None,
                    help="grammar tokenizer (GGUF or HF dir); default: the embedded SmolLM2")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each, best kept")
    args = ap.parse_args()
    config = build_config(overrides=engine_overrides(args))
    tok = load_tokenizer(args.tokenizer or config.model.tokenizer or str(default_gguf_path()))
    core = EngineCore(config, InprocExecutor(config))
    info = core.start()
    core.set_grammar_vocab(GrammarVocab(tok.to_json(), tok.eos_token_ids))
    rng = random.Random(0)

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(100, min(info.vocab_size, 32000)) for _ in range(args.prompt_len)]
                for _ in range(n)]

    run(core, prompts(4), 8, None)  # warm-up (and the grammar vocabulary is built)
    run(core, prompts(4), 8, schema())
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{info.device} {info.dtype}, {time.strftime('%Y-%m-%d')}, "
          f"prompt {args.prompt_len}, output {args.output_len}")
    print("| batch | unconstrained tok/s | JSON schema tok/s | JSON slower by |")
    print("| ---: | ---: | ---: | ---: |")
    for batch in args.batch:
        best = {"free": 0.0, "json": 0.0}
        for _ in range(args.repeats):  # interleaved, best of each: a small CPU is noisy
            for name, grammar in (("free", None), ("json", schema())):
                r = run(core, prompts(batch), args.output_len, grammar)
                assert r["tokens"] == batch * args.output_len
                best[name] = max(best[name], r["tok_s"])
        slow = 1 - best["json"] / best["free"]
        print(f"| {batch} | {best['free']:.1f} | {best['json']:.1f} | {100 * slow:.1f}% |")
    free = [run(core, prompts(1), 1, None)["ttft_s"][0] for _ in range(3)]
    cold = [run(core, prompts(1), 1, schema(f"k{uuid.uuid4().hex[:6]}"))["ttft_s"][0]
            for _ in range(3)]
    warm = [run(core, prompts(1), 1, schema())["ttft_s"][0] for _ in range(3)]
    print("\n| TTFT (median of 3, batch 1) | ms |\n| --- | ---: |")
    for name, values in (("unconstrained", free), ("uncached schema (compiles)", cold),
                         ("cached schema", warm)):
        print(f"| {name} | {1e3 * sorted(values)[1]:.1f} |")
    core.shutdown()


if __name__ == "__main__":
    main()

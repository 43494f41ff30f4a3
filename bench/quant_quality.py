"""Weight-only quantization on the CPU against the model dtype: quality, and speed.

    python bench/quant_quality.py                 # quality of int8 and int4 vs none (bf16)
    python bench/quant_quality.py --speed         # plus batch-1 decode and 512-token prefill
    python bench/quant_quality.py --kv fp8_e4m3,fp8_e5m2  # fp8 KV (cache.kv_cache_dtype) vs auto

Quality on the embedded SmolLM2 with chat-templated prompts (the style of the tests):
  next-token  the log-probability, under each mode, of the reference's top next token after
              each prompt: mean and max |difference|, and how often the top token agrees
              (over all prompts, and over those whose reference top-1 leads by more than
              CLEAR_MARGIN: the rest are ties at bf16 precision, which any change can flip)
  greedy      32 greedy tokens per prompt through the engine: prompts whose continuation is
              identical to the reference's, and the mean length of the common prefix
Speed: tokens/s of one 128-token greedy stream after a 16-token prompt (best of 3), and
prompt tokens/s of one 512-token prefill (best of 3), in one process, modes in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.offline import random_prompt, run_requests  # noqa: E402
from encore.configs.loading import build_config  # noqa: E402
from encore.protocol.messages import EngineRequest, SamplingParams  # noqa: E402
from encore.scheduler.engine import EngineCore  # noqa: E402
from encore.worker.executor import InprocExecutor  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash function is in one sentence.",
    "List three fruits.",
    "How do I reverse a list in Python?",
    "What is 12 times 7?",
    "Give me a synonym for 'happy'.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Tell me a fun fact about octopuses.",
    "Name the planets of the solar system.",
    "What does HTTP stand for?",
]


def chat_prompts() -> list[list[int]]:
    from encore.server.tokenizer import load_tokenizer
    from encore.worker.loader import default_gguf_path

    tok = load_tokenizer(str(default_gguf_path()))
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]))
            for p in PROMPTS]


def start(mode: str = "none", **overrides) -> EngineCore:
    config = build_config(overrides={"quantization": mode, "num_device_blocks": 256,
                                     **overrides})
    core = EngineCore(config, InprocExecutor(config))
    core.start()
    return core


def greedy(core: EngineCore, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=n)
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        out[f"q{i}"] = []
        core.add_request(EngineRequest(f"q{i}", p, params, time.time()))
    while core.has_work():
        for o in core.step():
            out[o.request_id].extend(o.new_token_ids)
    return [out[f"q{i}"] for i in range(len(prompts))]


def next_token_logprobs(core: EngineCore, prompts: list[list[int]]):
    """[prompts, V] log-probabilities of the token after each prompt (the model directly)."""
    import torch

    from encore.protocol.messages import ScheduledSeq

    runner = core.executor.worker.runner
    block = runner.block_size
    rows, nxt = [], 0
    for i, p in enumerate(prompts):
        blocks = -(-len(p) // block)
        seq = ScheduledSeq(f"lp{i}", p, 0, list(range(nxt, nxt + blocks)), True)
        nxt += blocks
        hidden, _ = runner._forward([seq])
        rows.append(runner.model.compute_logits(hidden[-1:]))
    return torch.log_softmax(torch.cat(rows).float(), -1)


# A reference top-1 that leads its runner-up by at most this (nats) is a tie at the model
# dtype's precision: bf16 logits near 16 move in steps of 0.125.
CLEAR_MARGIN = 0.25


def quality(modes: list[str], n: int = 32, num_prompts: int = len(PROMPTS)) -> dict:
    """Each quantization mode against the first (the reference)."""
    return compare({m: {"quantization": m} for m in modes}, n, num_prompts)


def compare(variants: dict[str, dict], n: int = 32, num_prompts: int = len(PROMPTS)) -> dict:
    """Each variant (config overrides) against the first (the reference)."""
    prompts = chat_prompts()[:num_prompts]
    results, ref_tokens, ref_lp = {}, None, None
    for name, overrides in variants.items():
        core = start(**overrides)
        tokens, lp = greedy(core, prompts, n), next_token_logprobs(core, prompts)
        core.shutdown()
        if ref_tokens is None:
            ref_tokens, ref_lp = tokens, lp
            continue
        top = ref_lp.argmax(-1)
        two = ref_lp.topk(2, -1).values
        clear = (two[:, 0] - two[:, 1]) > CLEAR_MARGIN
        diff = (lp.gather(1, top[:, None]) - ref_lp.gather(1, top[:, None])).abs().squeeze(1)
        common = []
        for a, b in zip(tokens, ref_tokens, strict=True):
            k = 0
            while k < min(len(a), len(b)) and a[k] == b[k]:
                k += 1
            common.append(k)
        results[name] = {
            "next_token_abs_logprob_err_mean": float(diff.mean()),
            "next_token_abs_logprob_err_max": float(diff.max()),
            "top1_agreement": float((lp.argmax(-1) == top).float().mean()),
            "top1_agreement_clear": float((lp.argmax(-1) == top)[clear].float().mean()),
            "top1_clear_prompts": int(clear.sum()),
            "greedy_identical": sum(a == b for a, b in zip(tokens, ref_tokens, strict=True)),
            "greedy_prompts": len(prompts),
            "greedy_common_prefix_mean": sum(common) / len(common),
        }
    return results


def speed(modes: list[str]) -> dict:
    out = {}
    for mode in modes:
        core = start(mode)
        rng = random.Random(0)
        vocab = core.worker.vocab_size
        run_requests(core, [random_prompt(rng, 16, vocab)], 8)
        decode = max(run_requests(core, [random_prompt(rng, 16, vocab)], 128)
                     ["decode_tokens_per_s"][0] for _ in range(3))
        prefill = min(run_requests(core, [random_prompt(rng, 512, vocab)], 1)["ttft_s"][0]
                      for _ in range(3))
        out[mode] = {"decode_tok_s": decode, "prefill512_tok_s": 512 / prefill}
        core.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="none,int8,int4")
    ap.add_argument("--kv", default=None, help="fp8 KV dtypes to compare with auto instead of "
                    "quantization modes, e.g. fp8_e4m3,fp8_e5m2")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    modes = args.modes.split(",")
    if args.kv:
        kv = {"auto": {}} | {d: {"kv_cache_dtype": d} for d in args.kv.split(",")}
        print(json.dumps({"date": time.strftime("%Y-%m-%d"), "kv_quality": compare(kv)},
                         indent=2))
        return
    res = {"date": time.strftime("%Y-%m-%d"), "quality": quality(modes)}
    if args.speed:
        res["speed"] = speed(modes)
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()

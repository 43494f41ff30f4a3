"""Tensor parallelism on one host: batch-1 decode and offline throughput at TP = 1, 2, 4.

    python bench/tp.py --model llama-3-8b --tp 1,2 --json $OUT/tp.json
    python bench/tp.py --model llama-3-70b --tp 4 --skip-offline

Each TP size runs the real engine over worker processes (``MPExecutor``, as the server
does: one per rank, NCCL between them), dummy bf16 weights of the named shape, CUDA graphs
on. Batch-1 decode: one 128-token prompt, 256 output tokens, ms per token from the decode
steps' timestamps (median). Offline: N x prompt -> output, ignore_eos, output tok/s. Bound
of a batch-1 token: the weight bytes a rank reads (its shard) / the measured copy bandwidth
of one card (device-to-device, bytes read + written). Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.offline import random_prompt, run_requests  # noqa: E402
from encore.configs.loading import build_config  # noqa: E402
from encore.protocol.executor import MPExecutor  # noqa: E402
from encore.scheduler.engine import EngineCore  # noqa: E402
from encore.worker.models.presets import preset  # noqa: E402


def copy_bandwidth() -> tuple[float, str]:
    """Bytes/s of a 2 GiB device-to-device copy (read + write) on GPU 0, and its name."""
    import torch
    import triton

    src = torch.randn(1024**3, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=100, rep=500,
                                 return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3), torch.cuda.get_device_name()


def decode_ms(core: EngineCore, vocab: int, output_len: int) -> float:
    """Median ms between consecutive tokens of one request (batch 1)."""
    from encore.protocol.messages import EngineRequest, SamplingParams

    rng = random.Random(1)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    core.add_request(EngineRequest("b1", random_prompt(rng, 128, vocab), params, time.time()))
    stamps = []
    while core.has_work():
        for out in core.step():
            stamps.extend(time.perf_counter() for _ in out.new_token_ids)
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]
    return 1e3 * statistics.median(gaps)


def run_tp(args, tp: int) -> dict:
    config = build_config(overrides={
        "model": args.model, "load_format": "dummy", "dtype": "bfloat16",
        "tensor_parallel_size": tp, "max_model_len": args.max_model_len,
        "max_num_batched_tokens": args.max_batched_tokens, "max_num_seqs": 256})
    core = EngineCore(config, MPExecutor(config))
    t = time.perf_counter()
    info = core.start()
    out: dict = {"tp": tp, "start_s": time.perf_counter() - t,
                 "kv_blocks": info.num_device_blocks}
    rng = random.Random(0)
    run_requests(core, [random_prompt(rng, 16, info.vocab_size) for _ in range(8)], 16)
    out["batch1_ms_per_token"] = min(decode_ms(core, info.vocab_size, args.decode_len)
                                     for _ in range(2))
    if not args.skip_offline:
        prompts = [random_prompt(rng, args.prompt_len, info.vocab_size)
                   for _ in range(args.num_requests)]
        r = run_requests(core, prompts, args.output_len)
        out.update(offline_tok_s=r["tokens_per_s"], offline_wall_s=r["wall_s"])
    core.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--decode-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    bw, card = copy_bandwidth()
    import torch

    torch.cuda.empty_cache()  # the workers size their KV pools from what is free
    arch = preset(args.model)
    weight_bytes = 2 * arch.num_params()
    res = {"model": args.model, "card": card, "copy_bytes_per_s": bw,
           "date": time.strftime("%Y-%m-%d"), "runs": []}
    for tp in (int(x) for x in args.tp.split(",")):
        r = run_tp(args, tp)
        r["bound_ms"] = 1e3 * weight_bytes / tp / bw
        r["vs_bound"] = r["batch1_ms_per_token"] / r["bound_ms"]
        res["runs"].append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    base = res["runs"][0]
    print(f"\n{args.model} dummy bf16 on {card}, copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'TP':>3} {'b1 ms/tok':>10} {'bound ms':>9} {'x bound':>8} {'x TP1':>6} "
          f"{'offline tok/s':>14} {'KV blocks':>10}")
    for r in res["runs"]:
        rel = r["batch1_ms_per_token"] / base["batch1_ms_per_token"]
        print(f"{r['tp']:>3} {r['batch1_ms_per_token']:>10.2f} {r['bound_ms']:>9.2f} "
              f"{r['vs_bound']:>8.2f} {rel:>6.2f} {r.get('offline_tok_s', 0):>14.0f} "
              f"{r['kv_blocks']:>10}")


if __name__ == "__main__":
    main()

"""GPU benchmark: Encore vs transformers' continuous batching vs the roofline, one command.

    python bench/gpu.py --json $OUT/gpu.json          # all parts, llama-3-8b dummy bf16
    python bench/gpu.py --parts roofline,engine       # skip transformers
    python bench/gpu.py --parts roofline,engine --batch1-only   # batch-1 decode alone

Parts run in child processes (each gets the whole GPU):
  roofline  measured bf16 matmul rate (8192^3, median of do_bench) and copy bandwidth
            (device-to-device copy of 2 GiB, bytes read + written)
  engine    the real engine in-process (scheduler + model runner, CUDA graphs), stepped
            synchronously: offline throughput (N x prompt x output, ignore_eos), batch-1
            decode ms/token, time to first token of a long prompt
  hf        transformers ``generate_batch`` (continuous batching, paged|sdpa) on a random-weight
            model of the same shape, same prompts, same output length

Bounds (docs/benchmarks-gpu.md explains them): throughput against max(FLOPs / rate,
bytes / bandwidth) over the whole run, batch-1 decode against weight bytes / bandwidth, TTFT
against its FLOPs / rate. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.offline import random_prompt, run_requests  # noqa: E402
from encore.protocol.heap import freeze_startup_heap, thaw_heap  # noqa: E402

KV_TOKEN_BYTES_KEY = "kv_bytes_per_token"
CONTEXT_RUN_TOKENS = 64  # tokens decoded per --batch1-contexts run (its bound: the mean context)


def prompts_for(args) -> list[list[int]]:
    rng = random.Random(0)
    return [random_prompt(rng, args.prompt_len, 128256) for _ in range(args.num_requests)]


# ---------------------------------------------------------------- roofline

def part_roofline(args) -> dict:
    import torch
    import triton

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=200, rep=1000, return_mode="median")
    rate = 2 * 8192**3 / (ms * 1e-3)
    src = torch.randn(1024**3, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=100, rep=500,
                                 return_mode="median")
    bw = 2 * src.numel() * 2 / (ms * 1e-3)
    return {"matmul_flops": rate, "copy_bytes_per_s": bw,
            "card": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__}


# ---------------------------------------------------------------- engine

def model_numbers(arch) -> dict:
    """Matmul parameters of the layers, of the lm_head, and KV bytes per token (bf16)."""
    layer = (arch.hidden_size * (arch.q_size + 2 * arch.kv_size) + arch.q_size * arch.hidden_size
             + 3 * arch.hidden_size * arch.intermediate_size)
    return {"layer_params": arch.num_layers * layer,
            "head_params": arch.vocab_size * arch.hidden_size,
            "attn_width": arch.num_layers * arch.num_heads * arch.head_dim,
            KV_TOKEN_BYTES_KEY: arch.num_layers * 2 * arch.kv_size * 2}


def part_engine(args) -> dict:
    from encore.configs.loading import build_config
    from encore.scheduler.engine import EngineCore
    from encore.worker.executor import InprocExecutor

    config = build_config(overrides={
        "model": args.model, "load_format": "dummy", "dtype": "bfloat16", "device": "cuda",
        "max_num_seqs": args.max_num_seqs or args.num_requests,
        "max_num_batched_tokens": args.max_batched_tokens, "kv_cache_dtype": args.kv_cache_dtype,
        "async_scheduling": args.async_scheduling == "on"})
    t0 = time.perf_counter()
    core = EngineCore(config, InprocExecutor(config))
    info = core.start()
    freeze_startup_heap()  # as the server's processes do once ready
    runner = core.executor.worker.runner
    out = {"startup_s": time.perf_counter() - t0, "kv_blocks": info.num_device_blocks,
           "graph_sizes": len(runner.graphs.sizes) if runner.graphs else 0,
           **model_numbers(runner.arch)}
    out[KV_TOKEN_BYTES_KEY] = out[KV_TOKEN_BYTES_KEY] // 2 * runner.kv_dtype.itemsize
    rng = random.Random(1)
    run_requests(core, [random_prompt(rng, args.prompt_len, 128256) for _ in range(32)], 8)
    steps = record_steps(core)
    if not args.batch1_only:
        r = run_requests(core, prompts_for(args), args.output_len)
        out.update(throughput_tok_s=r["tokens_per_s"], throughput_wall_s=r["wall_s"],
                   output_tokens=r["output_tokens"], throughput_steps=summarize(steps),
                   preemptions=core.scheduler.snapshot()["preemptions"])
        steps.clear()
        if args.profile_decode:
            profile_decode(core, prompts_for(args), args.output_len, args.profile_decode)
        if args.throughput_only:
            core.shutdown()
            thaw_heap()
            return out
    decode = [run_requests(core, [random_prompt(rng, 16, 128256)], args.output_len)
              for _ in range(3)]
    out["batch1_ms_per_token_runs"] = [1e3 / d["decode_tokens_per_s"][0] for d in decode]
    out["batch1_ms_per_token"] = min(out["batch1_ms_per_token_runs"])
    out["batch1_steps"] = summarize(steps)
    long = [run_requests(core, [random_prompt(rng, args.prompt_len, 128256)], args.output_len)
            for _ in range(2)]  # the same at prompt_len tokens of context (512 -> 640)
    out["batch1_long_ms_per_token"] = min(1e3 / d["decode_tokens_per_s"][0] for d in long)
    out["batch1_by_context"] = {  # ms/token of CONTEXT_RUN_TOKENS after a prompt of L
        L: min(1e3 / run_requests(core, [random_prompt(rng, L, 128256)], CONTEXT_RUN_TOKENS)
               ["decode_tokens_per_s"][0] for _ in range(2))
        for L in map(int, filter(None, args.batch1_contexts.split(",")))}
    out["graph_replay_ms"] = graph_replay_ms(runner)
    out["batch1_replay_ms_by_bucket"] = bucket_replay_ms(runner)
    ops = getattr(runner.model, "ops", None)
    out["one_row_linear_us"] = {  # (gemv, cuBLAS) or (folded, separate) per weight shape and
        # fold, from the ops' warm-up
        f"{k[0]}x{k[1]}" + (f" {k[4]}" if len(k) > 4 else ""): [round(1e3 * t, 1) for t in v]
        for k, v in getattr(ops, "gemv_timings", {}).items()}
    if args.profile:
        profile_replay(runner, args.profile)
    if not args.batch1_only:
        ttft = [run_requests(core, [random_prompt(rng, args.ttft_len, 128256)], 1)["ttft_s"][0]
                for _ in range(3)]
        out["ttft_ms"] = 1e3 * min(ttft)
        if args.profile_ttft:
            profile_ttft(core, random_prompt(rng, args.ttft_len, 128256), args.profile_ttft)
    core.shutdown()
    thaw_heap()
    return out


def record_steps(core) -> list[tuple[bool, float, float, int]]:
    """Wrap core.step and the runner's launch: (decode-only, step s, launch s, rows) per step
    (launch: the host's time to queue the step, and with a synchronous step before it the
    wait for that one)."""
    steps: list[tuple[bool, float, float, int]] = []
    runner, step = core.executor.worker.runner, core.step
    launch, last = runner.launch, {}

    def timed_launch(sched_out, *args, **kwargs):
        t = time.perf_counter()
        res = launch(sched_out, *args, **kwargs)
        last["exec"] = time.perf_counter() - t
        last["decode"] = all(len(s.token_ids) == 1 for s in sched_out.seqs)
        last["rows"] = len(sched_out.seqs)
        return res

    def timed_step():
        t = time.perf_counter()
        last.clear()
        res = step()
        if last:
            steps.append((last["decode"], time.perf_counter() - t, last["exec"], last["rows"]))
        return res

    runner.launch, core.step = timed_launch, timed_step
    return steps


def summarize(steps: list[tuple[bool, float, float, int]]) -> dict:
    dec = [s for s in steps if s[0]]
    other = [s for s in steps if not s[0]]
    ms = lambda xs: 1e3 * sum(xs) / max(len(xs), 1)  # noqa: E731
    return {"decode_steps": len(dec), "decode_step_ms": ms([s[1] for s in dec]),
            "decode_rows_max": max((s[3] for s in dec), default=0),
            "decode_rows_mean": sum(s[3] for s in dec) / max(len(dec), 1),
            "decode_execute_ms": ms([s[2] for s in dec]),
            "other_steps": len(other), "other_total_s": sum(s[1] for s in other),
            "other_execute_s": sum(s[2] for s in other)}


REPLAY_CONTEXT = 600  # a realistic context for the replay timings


def _padding_inputs(graphs, context: int) -> None:
    """Every row: token 0 (the staging's rows past a step's size may hold a placeholder, -1,
    from asynchronous scheduling), slot -1 (no KV written), ``context`` keys (stale block
    tables: reads only)."""
    graphs.scalars[0].fill_(0)
    graphs.scalars[2].fill_(-1)
    graphs.scalars[3].fill_(context)  # the graph copies it into its int32 seq_lens


def graph_replay_ms(runner) -> dict:
    """GPU time of one replay per captured size, at REPLAY_CONTEXT tokens."""
    import triton

    graphs = runner.graphs
    if graphs is None:
        return {}
    _padding_inputs(graphs, REPLAY_CONTEXT)
    sizes = sorted({1, 8, 64, graphs.sizes[-1]} & set(graphs.sizes))
    keys = [(s, graphs.bucket(s, REPLAY_CONTEXT)) for s in sizes]
    return {f"{s}@{b}": triton.testing.do_bench(graphs.graphs[s, b].replay, warmup=20, rep=100,
                                                return_mode="median") for s, b in keys}


def bucket_replay_ms(runner) -> dict:
    """Batch-1 replay time of every context bucket's graph at the same REPLAY_CONTEXT tokens:
    a sweep of the decode split count (the bucket only picks it; every graph reads all
    REPLAY_CONTEXT keys), the largest bucket being the single graph of before."""
    import triton

    graphs = runner.graphs
    if graphs is None:
        return {}
    _padding_inputs(graphs, REPLAY_CONTEXT)
    return {b: triton.testing.do_bench(graphs.graphs[1, b].replay, warmup=20, rep=100,
                                       return_mode="median") for b in graphs.buckets_for(1)}


def profile_replay(runner, path: str) -> None:
    """Kernel-time table of 20 batch-1 graph replays at REPLAY_CONTEXT tokens."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    graphs = runner.graphs
    _padding_inputs(graphs, REPLAY_CONTEXT)
    graph = graphs.graphs[1, graphs.bucket(1, REPLAY_CONTEXT)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))


def profile_decode(core, prompts: list[list[int]], output_len: int, path: str,
                   first: int = 40, count: int = 20) -> None:
    """The offline run again, profiled over ``count`` of its decode-only steps (from step
    ``first``): GPU time per kernel and host time per op, against the steps' wall time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    step, n, wall = core.step, [0], [0.0]

    def profiled_step():
        n[0] += 1
        if n[0] == first:
            torch.cuda.synchronize()
            prof.start()
            wall[0] = time.perf_counter()
        res = step()
        if n[0] == first + count - 1:
            torch.cuda.synchronize()
            wall[0] = time.perf_counter() - wall[0]
            prof.stop()
        return res

    core.step = profiled_step
    try:
        run_requests(core, prompts, output_len)
    finally:
        core.step = step
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    with open(path, "w") as f:
        f.write(f"{count} steps from step {first}: wall {1e3 * wall[0] / count:.2f} ms/step, "
                f"GPU kernels {gpu_us / 1e3 / count:.2f} ms/step (profiled)\n\n")
        f.write(events.table(sort_by="self_device_time_total", row_limit=25))
        f.write("\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=40))


def profile_ttft(core, prompt: list[int], path: str) -> None:
    """Kernel-time table of one long-prompt prefill (the TTFT step), GPU time per kernel."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_requests(core, [prompt], 1)
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))


# ---------------------------------------------------------------- transformers

def part_hf(args) -> dict:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from encore.worker.models.presets import preset

    arch = preset(args.model)
    cfg = LlamaConfig(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                      intermediate_size=arch.intermediate_size,
                      num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
                      num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                      max_position_embeddings=arch.max_position_embeddings,
                      rms_norm_eps=arch.rms_norm_eps)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation=args.hf_attn,
                                              dtype=torch.bfloat16).eval()
    gen = GenerationConfig(max_new_tokens=args.output_len, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    rng = random.Random(1)
    with torch.no_grad():
        model.generate_batch(inputs=[random_prompt(rng, 64, 128256) for _ in range(4)],
                             generation_config=GenerationConfig(max_new_tokens=8, do_sample=False,
                                                                eos_token_id=None, pad_token_id=0))
        torch.cuda.synchronize()
        t = time.perf_counter()
        results = model.generate_batch(inputs=prompts_for(args), generation_config=gen)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    tokens = sum(len(r.generated_tokens) for r in results.values())
    return {"throughput_tok_s": tokens / wall, "wall_s": wall, "output_tokens": tokens,
            "attn_implementation": args.hf_attn}


# ---------------------------------------------------------------- bounds and table

def bounds(args, roof: dict, eng: dict) -> dict:
    """Lower-bound times (s) from the measured rate R and bandwidth W (see the docs)."""
    R, W = roof["matmul_flops"], roof["copy_bytes_per_s"]
    P, Ph, A, kv = (eng["layer_params"], eng["head_params"], eng["attn_width"],
                    eng[KV_TOKEN_BYTES_KEY])
    n, L, out = args.num_requests, args.prompt_len, args.output_len
    weights = 2 * (P + Ph)
    prefill_flops = n * (2 * P * L + 2 * Ph + 2 * A * L * L)  # causal: 4*A*L^2/2
    ctx = [L + j for j in range(1, out)]  # decode j reads L + j keys
    decode_flops = n * sum(2 * (P + Ph) + 4 * A * c for c in ctx)
    run_bytes = out * weights + n * sum(ctx) * kv
    strict = max((prefill_flops + decode_flops) / R, run_bytes / W)
    phased = prefill_flops / R + sum(max(n * (2 * (P + Ph) + 4 * A * c) / R,
                                         (weights + n * c * kv) / W) for c in ctx)
    T = args.ttft_len
    return {"throughput_bound_tok_s": n * out / strict, "phased_bound_tok_s": n * out / phased,
            "batch1_bound_ms": 1e3 * (weights + 16 * kv) / W,
            "batch1_long_bound_ms": 1e3 * (weights + (L + out // 2) * kv) / W,
            "batch1_by_context_bound_ms": {
                c: 1e3 * (weights + (int(c) + CONTEXT_RUN_TOKENS // 2) * kv) / W
                for c in eng.get("batch1_by_context", {})},
            "ttft_bound_ms": 1e3 * (2 * P * T + 2 * Ph + 2 * A * T * T) / R}


def table(res: dict) -> str:
    roof, eng, hf, b = res["roofline"], res["engine"], res.get("hf", {}), res["bounds"]
    hf_tps = hf.get("throughput_tok_s")
    long, long_bound = eng["batch1_long_ms_per_token"], b["batch1_long_bound_ms"]
    rows = [("batch-1 ms/token", eng["batch1_ms_per_token"], b["batch1_bound_ms"],
             f"{eng['batch1_ms_per_token'] / b['batch1_bound_ms']:.2f}x of bound (<=1.10)"),
            ("  same, 512-token ctx", long, long_bound, f"{long / long_bound:.2f}x of bound")]
    for c, ms in eng.get("batch1_by_context", {}).items():
        cb = b["batch1_by_context_bound_ms"][c]
        rows.append((f"  same, {c}-token ctx", ms, cb, f"{ms / cb:.2f}x of bound"))
    if "throughput_tok_s" in eng:  # not with --batch1-only
        tps = eng["throughput_tok_s"]
        rows[:0] = [
            ("offline tok/s", tps, b["throughput_bound_tok_s"],
             f"{b['throughput_bound_tok_s'] / tps:.2f}x of bound (<=1.25)"),
            ("  phased bound tok/s", b["phased_bound_tok_s"], None, ""),
            ("  transformers tok/s", hf_tps, None,
             f"encore {tps / hf_tps:.1f}x (>=10)" if hf_tps else "not run"),
        ]
        rows.append(("TTFT 4k ms", eng["ttft_ms"], b["ttft_bound_ms"],
                     f"{eng['ttft_ms'] / b['ttft_bound_ms']:.2f}x of bound (<=1.10)"))
    lines = [f"{'metric':<24}{'measured':>12}{'bound':>12}  ratio", "-" * 72]
    for name, val, bound, note in rows:
        v = f"{val:.1f}" if val else "-"
        bb = f"{bound:.1f}" if bound else ""
        lines.append(f"{name:<24}{v:>12}{bb:>12}  {note}")
    lines.append(f"card={roof['card']} matmul={roof['matmul_flops'] / 1e12:.0f} TFLOP/s "
                 f"copy={roof['copy_bytes_per_s'] / 1e12:.2f} TB/s torch={roof['torch']} "
                 f"triton={roof['triton']} kv_blocks={eng['kv_blocks']} "
                 f"startup={eng['startup_s']:.0f}s")
    return "\n".join(lines)


PARTS = {"roofline": part_roofline, "engine": part_engine, "hf": part_hf}


def run_part(name: str, argv: list[str], timeout: float) -> dict:
    """One part in a child process (a fresh CUDA context); {} with the error when it fails."""
    path = f"/tmp/encore-gpu-{name}-{os.getpid()}.json"
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--part", name, "--json", path]
    try:
        proc = subprocess.run(cmd, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}"}
    with open(path) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--ttft-len", type=int, default=4096)
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=0, help="0: --num-requests")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto, fp8_e4m3 or fp8_e5m2")
    ap.add_argument("--async-scheduling", default="on", choices=["on", "off"])
    ap.add_argument("--hf-attn", default="paged|sdpa")
    ap.add_argument("--hf-timeout", type=float, default=300)
    ap.add_argument("--parts", default="roofline,engine,hf")
    ap.add_argument("--profile", default="", help="write a batch-1 kernel table here")
    ap.add_argument("--profile-decode", default="",
                    help="write a profile of 20 decode-only steps of a second offline run here")
    ap.add_argument("--profile-ttft", default="",
                    help="write a kernel table of one --ttft-len prefill here")
    ap.add_argument("--batch1-contexts", default="",
                    help="engine part: batch-1 ms/token also after prompts of these lengths "
                         "(comma-separated, e.g. 2048,4096,8000), 64 tokens each")
    ap.add_argument("--batch1-only", action="store_true",
                    help="engine part: batch-1 decode and replay times only (no offline "
                         "throughput, no TTFT)")
    ap.add_argument("--throughput-only", action="store_true",
                    help="engine part: offline throughput only (no batch-1, replay or TTFT "
                         "timings): the fp8 KV comparison at a KV-bound shape")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.part:
        with open(args.json, "w") as f:
            json.dump(PARTS[args.part](args), f)
        return
    argv = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}")
            for k, v in vars(args).items()
            if k not in ("part", "json", "parts") and v is not False]
    res = {name: run_part(name, argv, args.hf_timeout if name == "hf" else 900)
           for name in args.parts.split(",")}
    if "error" not in res.get("roofline", {"error": 1}) and "error" not in res.get(
            "engine", {"error": 1}):
        res["bounds"] = bounds(args, res["roofline"], res["engine"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps(res, indent=1))
    if "bounds" in res:
        print(table(res))


if __name__ == "__main__":
    main()

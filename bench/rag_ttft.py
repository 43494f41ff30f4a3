"""Time to first token of a RAG prompt: full prefill (cold) vs blended from cached chunks.

    python bench/rag_ttft.py                                     # SmolLM2 on the CPU
    python bench/rag_ttft.py --model llama-3-8b --load-format dummy --dtype bfloat16 \
        --device cuda

A prompt is a short preamble, ``--chunks`` documents of ``--chunk-tokens`` tokens each, and a
``--question-tokens`` question (random token ids: speed does not depend on them). The documents
are stored once (one request marks them as chunks). Then every trial builds a new prompt: a
new preamble and question, the documents in a new order, so the prefix cache cannot help:

    cold      the prompt without chunk marks: a full prefill
    blend_F   the same prompt with the documents marked as chunks, recompute fraction F

TTFT is measured from submitting the request to its first token, one request at a time,
engine stepped synchronously in this thread (as ``bench/offline.py``). Prints one table last.
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

from bench.common import add_engine_args, engine_overrides  # noqa: E402
from encore.configs.loading import build_config  # noqa: E402
from encore.protocol.messages import EngineRequest, SamplingParams  # noqa: E402
from encore.scheduler.engine import EngineCore  # noqa: E402
from encore.worker.executor import InprocExecutor  # noqa: E402


def ttft(core: EngineCore, rid: str, prompt: list[int], chunks: list[tuple[int, int]],
         recompute: float | None) -> tuple[float, int]:
    """Seconds to the first token, and the cached tokens the engine reported."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    req = EngineRequest(rid, prompt, params, time.time(), chunks=chunks,
                        chunk_recompute=recompute)
    start = time.perf_counter()
    errors = core.add_request(req)
    if errors:
        raise SystemExit(f"request refused: {errors[0].error}")
    first, cached = None, 0
    while core.has_work():
        for out in core.step():
            if out.error:
                raise SystemExit(f"request failed: {out.error}")
            if out.new_token_ids and first is None:
                first = time.perf_counter() - start
                cached = out.num_cached_tokens
    return first or 0.0, cached


def build(rng: random.Random, docs: list[list[int]], vocab: int, preamble: int,
          question: int, order: list[int] | None = None
          ) -> tuple[list[int], list[tuple[int, int]]]:
    """A prompt with ``docs`` in ``order`` (default: random) between a random preamble and
    question."""
    if order is None:
        order = list(range(len(docs)))
        rng.shuffle(order)
    prompt = [rng.randrange(10, vocab) for _ in range(preamble)]
    spans = []
    for i in order:
        spans.append((len(prompt), len(prompt) + len(docs[i])))
        prompt += docs[i]
    prompt += [rng.randrange(10, vocab) for _ in range(question)]
    return prompt, spans


def profile_one(core: EngineCore, rng: random.Random, docs: list[list[int]], vocab: int,
                args, fraction: float) -> None:
    """Print where one blended request's time goes (torch profiler, top ops)."""
    from torch.profiler import ProfilerActivity, profile

    prompt, spans = build(rng, docs, vocab, args.preamble_tokens, args.question_tokens)
    activities = [ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        ttft(core, "profiled", prompt, spans, fraction)
    key = "cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18), file=sys.stderr)
    # the engine's phases of one blended request, stepped by hand
    prompt, spans = build(rng, docs, vocab, args.preamble_tokens, args.question_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    core.add_request(EngineRequest("phases", prompt, params, time.time(), chunks=spans,
                                   chunk_recompute=fraction))
    sched = core.scheduler
    while sched.has_work():
        t0 = time.perf_counter()
        step = sched.schedule()
        t1 = time.perf_counter()
        result = core.executor.execute(step)
        t2 = time.perf_counter()
        sched.update_from_output(step, result)
        t3 = time.perf_counter()
        print(f"step {step.step_id}: schedule {1e3 * (t1 - t0):.2f} ms, execute "
              f"{1e3 * (t2 - t1):.2f} ms, update {1e3 * (t3 - t2):.2f} ms", file=sys.stderr)


def run(args) -> dict:
    config = build_config(overrides=engine_overrides(
        args, chunk_check_layer=args.check_layer, enforce_eager=args.enforce_eager or None))
    core = EngineCore(config, InprocExecutor(config))
    info = core.start()
    rng = random.Random(args.seed)
    vocab = info.vocab_size
    docs = [[rng.randrange(10, vocab) for _ in range(args.chunk_tokens)]
            for _ in range(args.chunks)]
    fractions = [float(f) for f in args.fractions.split(",")]
    # warm-up: kernels for these shapes, and the chunk store (the first blend stores them)
    for w in range(2):
        prompt, _ = build(rng, docs, vocab, args.preamble_tokens, args.question_tokens)
        ttft(core, f"warm-cold-{w}", prompt, [], None)
        prompt, spans = build(rng, docs, vocab, args.preamble_tokens, args.question_tokens)
        ttft(core, f"warm-blend-{w}", prompt, spans, fractions[0])
    times: dict[str, list[float]] = {"cold": []}
    cached: dict[str, int] = {}
    for f in fractions:
        times[f"blend_{f:g}"] = []
    for t in range(args.trials):
        # one document order per trial; every mode gets its own preamble and question, so no
        # mode finds another's prompt in the prefix cache
        order = rng.sample(range(len(docs)), len(docs))
        shape = (vocab, args.preamble_tokens, args.question_tokens, order)
        prompt, _ = build(rng, docs, *shape)
        times["cold"].append(ttft(core, f"cold-{t}", prompt, [], None)[0])
        for f in fractions:
            prompt, spans = build(rng, docs, *shape)
            seconds, cached[f"blend_{f:g}"] = ttft(core, f"blend-{f}-{t}", prompt, spans, f)
            times[f"blend_{f:g}"].append(seconds)
    if args.profile:
        profile_one(core, rng, docs, vocab, args, fractions[0])
    cold = statistics.median(times["cold"])
    modes = {}
    for mode, values in times.items():
        med = statistics.median(values)
        modes[mode] = {"ttft_ms_p50": med * 1e3, "ttft_ms_min": min(values) * 1e3,
                       "speedup": cold / med, "cached_tokens": cached.get(mode, 0),
                       "ttft_ms_all": [round(v * 1e3, 2) for v in values]}
    return {"device": info.device, "dtype": info.dtype, "model": args.model or "SmolLM2-135M",
            "prompt_tokens": len(prompt), "chunks": args.chunks,
            "chunk_tokens": args.chunk_tokens, "trials": args.trials, "modes": modes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chunks", type=int, default=6)
    p.add_argument("--chunk-tokens", type=int, default=512)
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--preamble-tokens", type=int, default=16)
    p.add_argument("--fractions", default="0.15,0.05,0.3", help="recompute fractions to time")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-layer", type=int, default=None)
    add_engine_args(p, max_num_batched_tokens=8192)  # the whole cold prompt in one step
    p.add_argument("--json", default=None)
    p.add_argument("--profile", action="store_true", help="profile one blended request")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    args = p.parse_args()
    out = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print(f"\n{out['model']} on {out['device']} ({out['dtype']}): {out['prompt_tokens']}-token "
          f"prompt, {out['chunks']} chunks x {out['chunk_tokens']}, median of {out['trials']}")
    print(f"{'mode':<11} {'TTFT ms':>9} {'min ms':>8} {'speedup':>8} {'cached':>7}")
    for mode, s in out["modes"].items():
        print(f"{mode:<11} {s['ttft_ms_p50']:>9.1f} {s['ttft_ms_min']:>8.1f} "
              f"{s['speedup']:>7.2f}x {s['cached_tokens']:>7}")


if __name__ == "__main__":
    main()

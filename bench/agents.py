"""Agent-program benchmark (Continuum): job completion time per cache / queue configuration.

    python bench/agents.py --num-threads 1       # SmolLM2 on the CPU, small scale (~3 min)
    python bench/agents.py --model llama-3-8b --load-format dummy --dtype bfloat16 \\
        --device cuda --jobs 40 --rate 2.0 --turns-min 5 --turns-max 30 \\
        --tool-tokens-min 200 --tool-tokens-max 3000 --output-min 50 --output-max 200 \\
        --system-tokens 512 --task-tokens 256 --time-scale 0.5 --num-device-blocks 4096 \\
        --max-num-seqs 64 --max-num-batched-tokens 8192 --host-cache-gib 32 \\
        --json agents-gpu.json

Simulated agent jobs shaped like SWE-bench traces: each job is a program of several turns.
A turn sends the whole history (a shared system prompt, the job's task, then every earlier
model output and tool output) and generates ``--output-min..--output-max`` tokens; then the
agent "runs a tool" for a real wall-clock duration drawn from that tool's range (below, times
``--time-scale``), and the tool's output (``--tool-tokens-min..max`` tokens, log-uniform) is
appended to the next turn's prompt. Jobs arrive as a Poisson process (``--rate`` jobs per
second). Every turn carries ``prompt_cache_key=<job id>``; the last one ``is_last_step``. A
turn that calls a tool is reported to the engine with the tool's name (``tool_called``), as the
server does once its tool-call parser has read the model's call.
A job whose context would outgrow ``--max-context`` (default: the model's limit) ends early.

    tool        weight   duration (s, before --time-scale)
    ls          0.20     0.1 - 0.5
    grep        0.20     0.1 - 0.5
    read_file   0.25     0.5 - 1.5
    edit        0.15     1.0 - 3.0
    run_tests   0.20     5.0 - 30.0

Configurations (each gets the same jobs: every random draw comes from ``--seed``):

    none             prefix caching off (every turn recomputes its whole context)
    lru              prefix caching, device pool only, LRU eviction, FCFS queue, no pins
    lru+host         lru + a host KV tier (default: as large as every job's final KV)
    pins+pfcfs       TTL pins between turns + program-level FCFS queue (Continuum)
    pins+pfcfs+host  pins+pfcfs + the same host tier (expired pins demote to it)

and, by name only (to tell the mechanisms apart): ``pfcfs`` (program FCFS, no pins) and
``pfcfs+host`` (program FCFS + the host tier, no pins).

The device pool (``--num-device-blocks``) is kept small so that the jobs' live contexts do not
fit and LRU evicts between turns. The engine runs in-process and is stepped by this thread;
while no request is runnable the thread sleeps until the next arrival or tool completion, so
tool calls take real time. Job completion time = the job's arrival (its first request is due)
→ the last token of its last turn. Prints one table last; ``--json OUT`` dumps everything.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import add_engine_args, engine_overrides  # noqa: E402
from encore.configs.loading import build_config  # noqa: E402
from encore.protocol.messages import EngineRequest, SamplingParams  # noqa: E402
from encore.scheduler.engine import EngineCore  # noqa: E402
from encore.worker.executor import InprocExecutor  # noqa: E402

CONFIGS = ("none", "lru", "lru+host", "pins+pfcfs", "pins+pfcfs+host")
EXTRA_CONFIGS = ("pfcfs", "pfcfs+host")

# tool name -> (weight, min seconds, max seconds) before --time-scale
TOOLS: dict[str, tuple[float, float, float]] = {
    "ls": (0.20, 0.1, 0.5),
    "grep": (0.20, 0.1, 0.5),
    "read_file": (0.25, 0.5, 1.5),
    "edit": (0.15, 1.0, 3.0),
    "run_tests": (0.20, 5.0, 30.0),
}


@dataclass
class Turn:
    output_len: int
    tool: str | None = None  # None on the last turn
    tool_s: float = 0.0  # real seconds (time scale applied)
    tool_tokens: list[int] = field(default_factory=list)


@dataclass
class Job:
    job_id: str
    arrival: float  # seconds after the start of the run
    prompt: list[int]  # first turn's prompt
    turns: list[Turn]

    @property
    def final_context(self) -> int:
        return len(self.prompt) + sum(t.output_len + len(t.tool_tokens) for t in self.turns)


@dataclass
class JobState:
    job: Job
    context: list[int]
    turn: int = 0
    start: float = 0.0  # absolute monotonic time the job was due
    submitted: float = 0.0  # when the current turn was submitted
    output: list[int] = field(default_factory=list)
    failed: bool = False


@dataclass
class Result:
    name: str
    jct: list[float] = field(default_factory=list)
    ttft_first: list[float] = field(default_factory=list)  # first turns
    ttft_resume: list[float] = field(default_factory=list)  # later turns (after a tool)
    wall_s: float = 0.0
    jobs: int = 0
    failed: int = 0
    turns: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0  # prompt tokens of every turn
    cached_tokens: int = 0  # of which reused (per-request num_cached_tokens)
    computed_prompt_tokens: int = 0  # engine counter (includes recompute after preemption)
    preemptions: int = 0
    pin_hits: int = 0
    pin_expired: int = 0
    pin_ttls: list[float] = field(default_factory=list)
    tier_hits: dict[str, int] = field(default_factory=dict)
    engine_jct: list[float] = field(default_factory=list)  # the engine's own measurement


# ----------------------------------------------------------------------------- workload
def make_jobs(args, vocab: int) -> list[Job]:
    """The same jobs for every configuration (one RNG, seeded)."""
    rng = random.Random(args.seed)
    hi = min(vocab, 32000)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, hi) for _ in range(n)]

    names = list(TOOLS)
    weights = [TOOLS[n][0] for n in names]
    system = tokens(args.system_tokens)  # the agent scaffold's prompt, shared by every job
    jobs, t = [], 0.0
    for j in range(args.jobs):
        if j:
            t += rng.expovariate(args.rate)
        prompt = system + tokens(args.task_tokens)
        n_turns = rng.randint(args.turns_min, args.turns_max)
        turns: list[Turn] = []
        ctx = len(prompt)
        for k in range(n_turns):
            out = rng.randint(args.output_min, args.output_max)
            tool = rng.choices(names, weights)[0]
            _, lo, hi_s = TOOLS[tool]
            dur = rng.uniform(lo, hi_s) * args.time_scale
            n_tool = int(round(math.exp(rng.uniform(math.log(args.tool_tokens_min),
                                                    math.log(args.tool_tokens_max)))))
            tool_tokens = tokens(n_tool)
            nxt_out = args.output_max  # the next turn must still fit, whatever it generates
            if k == n_turns - 1 or ctx + out + n_tool + nxt_out > args.max_context:
                turns.append(Turn(out))
                break
            turns.append(Turn(out, tool, dur, tool_tokens))
            ctx += out + n_tool
        jobs.append(Job(f"job-{j}", t, prompt, turns))
    return jobs


# ----------------------------------------------------------------------------- configs
def overrides_for(name: str, args, host_gib: float) -> dict:
    base = engine_overrides(args, kv_load_policy=args.kv_load_policy,
                            max_pinned_fraction=args.max_pinned_fraction)
    if name == "none":
        return {**base, "enable_prefix_caching": False, "enable_ttl_pins": False}
    if name == "lru":
        return {**base, "enable_ttl_pins": False, "policy": "fcfs"}
    if name == "lru+host":
        return {**base, "enable_ttl_pins": False, "policy": "fcfs", "host_cache_gib": host_gib}
    if name in ("pfcfs", "pfcfs+host"):
        host = {"host_cache_gib": host_gib} if name.endswith("+host") else {}
        return {**base, "enable_ttl_pins": False, "policy": "program_fcfs", **host}
    if name == "pins+pfcfs":
        return {**base, "enable_ttl_pins": True, "policy": "program_fcfs"}
    if name == "pins+pfcfs+host":
        return {**base, "enable_ttl_pins": True, "policy": "program_fcfs",
                "host_cache_gib": host_gib}
    raise SystemExit(f"unknown config {name!r}; choose from {', '.join(CONFIGS + EXTRA_CONFIGS)}")


_BLOCK_BYTES: list[int] = []  # bytes of one KV block, learned from the first engine started


def start_engine(name: str, args, host_gib: float = 0.0) -> tuple[EngineCore, int]:
    """A started engine for ``name`` and the model's vocabulary size."""
    config = build_config(overrides=overrides_for(name, args, host_gib))
    core = EngineCore(config, InprocExecutor(config))
    info = core.start()
    assert core.worker is not None
    if not _BLOCK_BYTES:
        _BLOCK_BYTES.append(core.worker.kv_block_bytes)
    return core, info.vocab_size


def warm_up(core: EngineCore, vocab: int, args) -> None:
    """A long prefill and a small decode batch (kernels, allocator), then drop the stats."""
    rng = random.Random(-1)
    n = min(512, args.max_context // 2)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i in range(4):
        prompt = [rng.randrange(100, min(vocab, 32000)) for _ in range(n if i == 0 else 32)]
        core.add_request(EngineRequest(f"warmup-{i}", prompt, params, arrival_time=time.time()))
    while core.has_work():
        core.step()
    core.scheduler.stats()  # counters are increments since the last call: start from zero


# ----------------------------------------------------------------------------- the run
def run_config(name: str, args, jobs: list[Job] | None) -> tuple[Result, list[Job]]:
    host_gib = 0.0
    if "host" in name:
        if jobs is None:  # the jobs (which need the vocabulary) size the host tier: probe
            core, vocab = start_engine("lru", args)
            core.shutdown()
            jobs = make_jobs(args, vocab)
        host_blocks = sum(j.final_context for j in jobs) // 16 + 16
        host_gib = args.host_cache_gib or host_blocks * _BLOCK_BYTES[0] / 1024**3
    core, vocab = start_engine(name, args, host_gib)
    if jobs is None:
        jobs = make_jobs(args, vocab)
    warm_up(core, vocab, args)
    result = drive(core, jobs, args, Result(name))
    core.shutdown()
    return result, jobs


def drive(core: EngineCore, jobs: list[Job], args, result: Result) -> Result:
    """Event loop: submit due turns, step the engine, sleep when nothing is runnable."""
    t0 = time.monotonic()
    due: list[tuple[float, int]] = [(t0 + j.arrival, i) for i, j in enumerate(jobs)]
    heapq.heapify(due)
    states = [JobState(j, list(j.prompt)) for j in jobs]
    inflight: dict[str, int] = {}
    done = 0
    end = t0
    while done < len(jobs):
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, i = heapq.heappop(due)
            st = states[i]
            if st.turn == 0:
                st.start = t0 + st.job.arrival
            rid = submit(core, st, args, result)
            inflight[rid] = i
        if not core.has_work():
            if due:
                time.sleep(max(0.0, min(due[0][0] - time.monotonic(), 0.05)))
            continue
        for out in core.step():
            i = inflight.get(out.request_id)
            if i is None:
                continue
            st = states[i]
            now = time.monotonic()
            if out.new_token_ids and not st.output:
                (result.ttft_resume if st.turn else result.ttft_first).append(now - st.submitted)
            st.output.extend(out.new_token_ids)
            if out.finish_reason is None:
                continue
            del inflight[out.request_id]
            result.turns += 1
            result.output_tokens += len(st.output)
            result.prompt_tokens += out.num_prompt_tokens
            result.cached_tokens += out.num_cached_tokens
            turn = st.job.turns[st.turn]
            if out.finish_reason in ("error", "abort"):
                st.failed = True
                print(f"# {result.name}: {out.request_id} failed: {out.error}", flush=True)
            if st.failed or turn.tool is None:
                done += 1
                end = max(end, now)
                if st.failed:
                    result.failed += 1
                else:
                    result.jct.append(now - st.start)
                continue
            core.tool_called(st.job.job_id, [turn.tool])  # as the server's tool parser does
            st.context.extend(st.output)
            st.context.extend(turn.tool_tokens)
            st.output = []
            st.turn += 1
            heapq.heappush(due, (now + turn.tool_s, i))
    result.wall_s = end - t0
    result.jobs = len(jobs)
    stats = core.scheduler.stats()
    result.computed_prompt_tokens = stats.prompt_tokens
    result.preemptions = stats.preemptions
    result.pin_hits = stats.pin_hits
    result.pin_expired = stats.pin_expired
    result.pin_ttls = list(stats.pin_ttl_seconds)
    result.engine_jct = list(stats.job_completion_seconds)
    result.tier_hits = dict(stats.kv_tier_hit_tokens) or {"device": stats.prefix_hits}
    return result


def submit(core: EngineCore, st: JobState, args, result: Result) -> str:
    turn = st.job.turns[st.turn]
    rid = f"{result.name}-{st.job.job_id}-t{st.turn}"
    params = SamplingParams(temperature=0.0, max_tokens=turn.output_len, ignore_eos=True)
    st.submitted = time.monotonic()
    st.output = []
    errors = core.add_request(EngineRequest(
        rid, list(st.context), params, arrival_time=time.time(),
        prompt_cache_key=st.job.job_id, is_last_step=turn.tool is None))
    if errors:
        raise SystemExit(f"{rid} refused: {errors[0].error}")
    return rid


# ----------------------------------------------------------------------------- report
def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def summary(r: Result) -> dict:
    return {"config": r.name, "jct_mean_s": mean(r.jct), "jct_p50_s": pct(r.jct, 0.5),
            "jct_p95_s": pct(r.jct, 0.95), "ttft_first_mean_s": mean(r.ttft_first),
            "ttft_resume_mean_s": mean(r.ttft_resume),
            "ttft_resume_p95_s": pct(r.ttft_resume, 0.95),
            "output_tok_per_s": r.output_tokens / r.wall_s if r.wall_s else float("nan"),
            "jobs_per_s": r.jobs / r.wall_s if r.wall_s else float("nan"),
            "wall_s": r.wall_s, "failed_jobs": r.failed}


def print_table(results: list[Result]) -> None:
    base = next((r for r in results if r.name == "lru"), None)
    print("| config | JCT mean (s) | JCT p95 (s) | vs lru (mean) | resume TTFT mean / p95 (s) "
          "| output tok/s | jobs/s | wall (s) | cached / prompt tokens | computed prompt "
          "tokens | pin hits | preempt | hits device/host |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s = summary(r)
        ratio = (f"{mean(base.jct) / s['jct_mean_s']:.2f}x" if base is not None and r.jct
                 else "-")
        h = r.tier_hits
        print(f"| {r.name} | {s['jct_mean_s']:.2f} | {s['jct_p95_s']:.2f} | {ratio} | "
              f"{s['ttft_resume_mean_s']:.2f} / {s['ttft_resume_p95_s']:.2f} | "
              f"{s['output_tok_per_s']:.1f} | {s['jobs_per_s']:.3f} | {r.wall_s:.1f} | "
              f"{r.cached_tokens}/{r.prompt_tokens} | {r.computed_prompt_tokens} | "
              f"{r.pin_hits} | {r.preemptions} | {h.get('device', '-')}/{h.get('host', '-')} |"
              + (f" ({r.failed} failed)" if r.failed else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # device pool in blocks of 16, small: LRU must evict
    add_engine_args(ap, dtype="bfloat16", num_device_blocks=128, max_num_seqs=8,
                    max_num_batched_tokens=512)
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--rate", type=float, default=1.5, help="Poisson job arrivals per second")
    ap.add_argument("--turns-min", type=int, default=3)
    ap.add_argument("--turns-max", type=int, default=6)
    ap.add_argument("--system-tokens", type=int, default=64, help="shared by every job")
    ap.add_argument("--task-tokens", type=int, default=32, help="each job's own task")
    ap.add_argument("--tool-tokens-min", type=int, default=50)
    ap.add_argument("--tool-tokens-max", type=int, default=200)
    ap.add_argument("--output-min", type=int, default=8)
    ap.add_argument("--output-max", type=int, default=16)
    ap.add_argument("--time-scale", type=float, default=0.2,
                    help="multiplies every tool duration (the table in the docstring)")
    ap.add_argument("--max-context", type=int, default=None,
                    help="a job ends before its context outgrows this (default: 8192, or "
                         "the device pool if smaller)")
    ap.add_argument("--max-pinned-fraction", type=float, default=None,
                    help="override cache.max_pinned_fraction (default: the config's)")
    ap.add_argument("--host-cache-gib", type=float, default=None,
                    help="host tier of the +host configs (default: every job's final KV)")
    ap.add_argument("--kv-load-policy", default=None, choices=["cost", "always"])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write every result here")
    args = ap.parse_args()
    pool_tokens = (args.num_device_blocks - 1) * 16
    if args.max_context is None:
        args.max_context = min(8192, pool_tokens - 16)
    jobs: list[Job] | None = None
    results: list[Result] = []
    for name in args.configs.split(","):
        r, jobs = run_config(name, args, jobs)
        if len(results) == 0:
            describe(jobs, pool_tokens)
        results.append(r)
        s = summary(r)
        print(f"# {name}: {r.wall_s:.1f}s, JCT mean {s['jct_mean_s']:.2f}s p95 "
              f"{s['jct_p95_s']:.2f}s, pin hits {r.pin_hits}, prefix hit tokens "
              f"{r.cached_tokens}/{r.prompt_tokens}, preemptions {r.preemptions}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": [summary(r) for r in results],
                       "results": [asdict(r) for r in results]}, f, indent=1)
    print_table(results)
    return 0


def describe(jobs: list[Job], pool_tokens: int) -> None:
    turns = [len(j.turns) for j in jobs]
    ctx = [j.final_context for j in jobs]
    tools = [t.tool_s for j in jobs for t in j.turns if t.tool is not None]
    print(f"# {len(jobs)} jobs over {jobs[-1].arrival:.1f}s; turns {min(turns)}-{max(turns)} "
          f"(mean {mean(turns):.1f}); final context {min(ctx)}-{max(ctx)} tokens (mean "
          f"{mean(ctx):.0f}); tool calls {len(tools)}, {min(tools, default=0):.2f}-"
          f"{max(tools, default=0):.2f}s (mean {mean(tools):.2f}s); device pool "
          f"{pool_tokens} tokens = {pool_tokens / mean(ctx):.1f} mean final contexts; all "
          f"jobs' KV = {sum(ctx) / pool_tokens:.1f}x the pool", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""Multi-turn chat benchmark for the KV tiers: TTFT and throughput per cache configuration.

    python bench/multiturn.py                      # SmolLM2 on the CPU, small scale
    python bench/multiturn.py --model llama-3-8b --load-format dummy --dtype bfloat16 \
        --device cuda --users 32 --turns 6 --concurrency 8 --system-tokens 512 \
        --user-tokens 128 --output-len 32 --max-num-batched-tokens 8192

Many users hold conversations of several turns; each turn's prompt is the whole
conversation so far (system prompt, earlier questions and answers) plus a new question, so
contexts grow turn by turn. Users take turns round-robin (all first turns, then all second
turns...), ``--concurrency`` requests at a time, so a user's KV is pushed out of the device
pool between its turns: the working set is sized to ``--working-set`` times the device KV
capacity. Configurations:

    none      prefix caching off (every turn recomputes its whole context)
    device    prefix caching on the device pool only
    host      device + host tier (large enough for the working set)
    disk      device + a host tier of one device pool + a disk tier (fresh temp directory)
    host@int8, disk@int4, ...   the same with the lower tiers' codec (``tier_kv_codec``);
              ``--tier-kv-codec none,int8`` runs host and disk with each codec listed

The engine runs in-process, stepped synchronously in this thread (as ``bench/offline.py``).
Prints one table last.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from encore.configs.loading import build_config  # noqa: E402
from encore.protocol.heap import freeze_startup_heap, thaw_heap  # noqa: E402
from encore.protocol.messages import EngineRequest, SamplingParams  # noqa: E402
from encore.scheduler.engine import EngineCore  # noqa: E402
from encore.worker.executor import InprocExecutor  # noqa: E402

CONFIGS = ("none", "device", "host", "disk")


@dataclass
class User:
    context: list[int]
    questions: list[list[int]]
    turn: int = 0


@dataclass
class Result:
    name: str
    ttft: list[float] = field(default_factory=list)
    ttft_at: list[float] = field(default_factory=list)  # when each first token came (s in)
    wall_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    tier_hits: dict[str, int] = field(default_factory=dict)
    load_s: list[float] = field(default_factory=list)  # each request's wait for tier loads
    transfer_s: list[float] = field(default_factory=list)  # their measured copy (+decode) time


def make_users(args, vocab: int) -> list[User]:
    rng = random.Random(args.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, min(vocab, 32000)) for _ in range(n)]

    system = tokens(args.system_tokens)  # shared by every user (a common system prompt)
    return [User(system + tokens(args.user_tokens),
                 [tokens(args.user_tokens) for _ in range(args.turns - 1)])
            for _ in range(args.users)]


def overrides_for(name: str, args, capacity_gib: float, disk_dir: str) -> dict:
    """The config of ``name`` (``host@int8``: config host, its tiers at codec int8); the disk
    tier in a directory of its own under ``disk_dir``."""
    name, _, codec = name.partition("@")
    base = {"model": args.model, "load_format": args.load_format, "dtype": args.dtype,
            "device": args.device,
            "num_device_blocks": args.num_device_blocks, "max_num_seqs": args.concurrency,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "num_threads": args.num_threads, "kv_load_policy": args.kv_load_policy}
    base = {k: v for k, v in base.items() if v is not None}
    tiers = {"tier_kv_codec": codec} if codec else {}
    if name == "none":
        return {**base, "enable_prefix_caching": False}
    if name == "host":
        return {**base, **tiers, "host_cache_gib": capacity_gib * args.working_set * 2}
    if name == "disk":
        return {**base, **tiers, "host_cache_gib": capacity_gib,
                "disk_cache_dir": os.path.join(disk_dir, f"{name}@{codec or 'none'}"),
                "disk_cache_gib": capacity_gib * args.working_set * 2}
    return base


def device_pool_gib(args) -> float:
    """GiB of the device pool (start the engine once to learn the bytes per block)."""
    probe = build_config(overrides=overrides_for("device", args, 0.0, ""))
    core = EngineCore(probe, InprocExecutor(probe))
    info = core.start()
    assert core.worker is not None
    gib = (info.num_device_blocks - 1) * core.worker.kv_block_bytes / 1024**3
    core.shutdown()
    thaw_heap()
    return gib


def run_config(name: str, args, capacity_gib: float, disk_dir: str,
               before_drive: Callable[[EngineCore], None] | None = None) -> Result:
    """Start an engine for ``name``, warm it up, run the users, shut it down.
    ``before_drive``: called with the warmed-up engine (``bench/step_phases.py`` times it)."""
    config = build_config(overrides=overrides_for(name, args, capacity_gib, disk_dir))
    core = EngineCore(config, InprocExecutor(config))
    info = core.start()
    freeze_startup_heap()  # as the server's processes do once ready
    warm_up(core, args, info.vocab_size)
    core.scheduler.stats()  # drains the warm-up's load times
    if before_drive is not None:
        before_drive(core)
    users = make_users(args, info.vocab_size)
    result = drive(core, users, args, Result(name))
    core.shutdown()
    thaw_heap()
    return result


def warm_up(core: EngineCore, args, vocab: int) -> None:
    """Two untimed batches of ``concurrency`` prompts (tokens no user has), the second
    extending the first (prefix hits): compiles the kernels of both paths, so that the
    first configuration measured pays no JIT."""
    rng = random.Random(-1)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompts = [[rng.randrange(100, min(vocab, 32000))
                for _ in range(args.system_tokens + args.user_tokens)]
               for _ in range(args.concurrency)]
    for round_ in range(2):
        for i, prompt in enumerate(prompts):
            prompt.extend(rng.randrange(100, min(vocab, 32000)) for _ in range(args.user_tokens))
            core.add_request(EngineRequest(f"warm-up-{round_}-{i}", list(prompt), params,
                                           arrival_time=time.time()))
        while core.has_unfinished():
            core.step()


def drive(core: EngineCore, users: list[User], args, result: Result) -> Result:
    """Closed loop: ``concurrency`` requests in flight; turns round-robin across users."""
    order = deque((u, t) for t in range(args.turns) for u in range(len(users)))
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    inflight: dict[str, tuple[int, float, list[int]]] = {}
    start = time.perf_counter()
    n = 0
    while order or inflight:
        while order and len(inflight) < args.concurrency and order[0][1] == users[
                order[0][0]].turn:
            uid, _ = order.popleft()
            rid = f"{result.name}-{n}"
            n += 1
            prompt = list(users[uid].context)
            inflight[rid] = (uid, time.perf_counter(), [])
            result.prompt_tokens += len(prompt)
            core.add_request(EngineRequest(rid, prompt, params, arrival_time=time.time()))
        for out in core.step():
            uid, t0, toks = inflight[out.request_id]
            if not toks and out.new_token_ids:
                result.ttft.append(time.perf_counter() - t0)
                result.ttft_at.append(time.perf_counter() - start)
            toks.extend(out.new_token_ids)
            if out.finish_reason is not None:
                finish_turn(users[uid], toks)
                result.output_tokens += len(toks)
                result.cached_tokens += out.num_cached_tokens
                del inflight[out.request_id]
    result.wall_s = time.perf_counter() - start
    slow = sorted(zip(result.ttft, result.ttft_at, strict=True), reverse=True)[:3]
    print(f"# {result.name}: slowest TTFTs " + ", ".join(
        f"{1e3 * t:.0f} ms (at {at:.2f} s)" for t, at in slow), flush=True)
    stats = core.scheduler.stats()
    result.tier_hits = dict(stats.labeled.get("kv_tier_hit_tokens", {})) or {
        "device": int(stats.values.get("prefix_hits", 0))}
    result.load_s = list(stats.observed.get("kv_tier_load_seconds", []))
    result.transfer_s = list(stats.observed.get("kv_tier_transfer_seconds", []))
    return result


def finish_turn(user: User, answer: list[int]) -> None:
    user.context.extend(answer)
    if user.turn < len(user.questions):
        user.context.extend(user.questions[user.turn])
    user.turn += 1


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default=None, help="dummy: random weights of a preset")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--num-threads", type=int, default=None)
    ap.add_argument("--users", type=int, default=12)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=128)
    ap.add_argument("--user-tokens", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--working-set", type=float, default=4.0,
                    help="working set / device KV capacity (sizes the device pool)")
    ap.add_argument("--num-device-blocks", type=int, default=None,
                    help="device pool; default: from --working-set")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--tier-kv-codec", default=None,
                    help="codecs of the lower tiers (none, int8, int4; comma-separated): the "
                         "host and disk configs run once with each (host@int8, ...)")
    ap.add_argument("--kv-load-policy", default=None, choices=["cost", "always"],
                    help="override the load-or-recompute policy (default: the config's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    final_ctx = args.system_tokens + args.turns * (args.user_tokens + args.output_len)
    working_set = args.users * final_ctx
    if args.num_device_blocks is None:
        args.num_device_blocks = max(final_ctx // 16 + 4,
                                     int(working_set / args.working_set) // 16 + 1)
    capacity = (args.num_device_blocks - 1) * 16
    args.capacity = capacity
    args.final_ctx, args.working_set_tokens = final_ctx, working_set
    return args


def main() -> int:
    args = parse_args()
    final_ctx, working_set, capacity = args.final_ctx, args.working_set_tokens, args.capacity
    print(f"# users={args.users} turns={args.turns} concurrency={args.concurrency} "
          f"final context={final_ctx} tokens; working set {working_set} tokens = "
          f"{working_set / capacity:.1f}x the device pool ({capacity} tokens)", flush=True)
    results = []
    capacity_gib = device_pool_gib(args)
    with tempfile.TemporaryDirectory(prefix="encore-bench-kv-") as disk_dir:
        for name in config_names(args):
            r = run_config(name, args, capacity_gib, disk_dir)
            results.append(r)
            print(f"# {name}: done in {r.wall_s:.1f}s", flush=True)
    print_table(results)
    return 0


def config_names(args) -> list[str]:
    """``--configs``, the host and disk configs once per ``--tier-kv-codec`` codec."""
    codecs = args.tier_kv_codec.split(",") if args.tier_kv_codec else [""]
    names = []
    for name in args.configs.split(","):
        if name in ("host", "disk"):
            names += [f"{name}@{c}" if c and c != "none" else name for c in codecs]
        else:
            names.append(name)
    return names


def print_table(results: list[Result]) -> None:
    print("| config | TTFT p50 (ms) | TTFT p99 (ms) | TTFT mean (ms) | output tok/s | "
          "wall (s) | cached / prompt tokens | hits device/host/disk | tier load p50 (ms) | "
          "transfer p50 (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        h = r.tier_hits
        print(f"| {r.name} | {pct(r.ttft, 0.5) * 1e3:.0f} | {pct(r.ttft, 0.99) * 1e3:.0f} | "
              f"{statistics.fmean(r.ttft) * 1e3:.0f} | {r.output_tokens / r.wall_s:.1f} | "
              f"{r.wall_s:.1f} | {r.cached_tokens}/{r.prompt_tokens} | "
              f"{h.get('device', '-')}/{h.get('host', '-')}/{h.get('disk', '-')} | "
              f"{pct(r.load_s, 0.5) * 1e3:.2f} | {pct(r.transfer_s, 0.5) * 1e3:.2f} |")


if __name__ == "__main__":
    sys.exit(main())

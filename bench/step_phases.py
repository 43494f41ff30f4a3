"""Where a multi-turn prefill step's time goes: per-phase times of the engine's steps.

    python bench/step_phases.py host --model llama-3-8b --load-format dummy \
        --dtype bfloat16 --device cuda --users 32 --turns 6 --concurrency 8 \
        --system-tokens 512 --user-tokens 128 --output-len 32 --max-num-batched-tokens 8192

Runs one ``bench/multiturn.py`` configuration (same flags) and times, for every step that
prefills, the phases of ``EngineCore.step``: scheduling, the tier ops issued before the
forward pass, batch preparation, the forward pass (CPU time to launch it, and GPU time from
an event before it to one after it, waits for host loads included), sampling, the tier
completions after it, and the scheduler's update. Prints the mean and the slowest steps (ms).
Diagnostic only: it wraps the engine's methods on the instance.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import multiturn  # noqa: E402
from encore.scheduler.engine import EngineCore  # noqa: E402

COUNTS = ("tokens", "loads", "stores")
PHASES = ("wall", "sched", "exec", "tiers_before", "prepare", "fwd_launch", "gpu_fwd",
          "sample", "tiers_after", "update")


class Phases:
    """Accumulates the phase times of the current step."""

    def __init__(self) -> None:
        self.cur: dict[str, Any] = {}
        self.events: list[tuple[Any, Any]] = []

    def wrap(self, obj: Any, attr: str, key: str, gpu: bool = False) -> None:
        orig: Callable[..., Any] = getattr(obj, attr)
        cuda = torch.cuda.is_available()

        def timed(*args: Any, **kwargs: Any) -> Any:
            start_event = None
            if gpu and cuda:
                start_event = torch.cuda.Event(enable_timing=True)
                start_event.record()
            start = time.perf_counter()
            out = orig(*args, **kwargs)
            self.cur[key] = self.cur.get(key, 0.0) + time.perf_counter() - start
            if start_event is not None:
                end_event = torch.cuda.Event(enable_timing=True)
                end_event.record()
                self.events.append((start_event, end_event))
            return out

        setattr(obj, attr, timed)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print(__doc__)
        return 2
    name = sys.argv[1]
    args = multiturn.parse_args(sys.argv[2:])
    capacity_gib = multiturn.device_pool_gib(args)
    rows: list[dict[str, Any]] = []
    decode_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="encore-bench-kv-") as disk_dir:
        result = multiturn.run_config(name, args, capacity_gib, disk_dir,
                                      lambda core: instrument(core, rows, decode_s))
    print(f"# {name}: TTFT p50 {multiturn.pct(result.ttft, 0.5) * 1e3:.1f} ms, "
          f"{len(rows)} prefill steps, {len(decode_s)} other steps "
          f"(mean {statistics.fmean(decode_s) * 1e3:.2f} ms)")
    print("| step | " + " | ".join(COUNTS + PHASES) + " |")
    print("|---" * (len(COUNTS) + len(PHASES) + 1) + "|")
    mean = {k: statistics.fmean(r.get(k, 0.0) for r in rows) for k in COUNTS + PHASES}
    print(row("mean", mean))
    for i, r in enumerate(sorted(rows, key=lambda r: -r["wall"])[:4]):
        print(row(f"slowest {i + 1}", r))
    return 0


def instrument(core: EngineCore, rows: list[dict[str, Any]], other: list[float]) -> None:
    """Wrap the engine's phases: each prefill step appends its phase times to ``rows``,
    every other step its wall time to ``other``."""
    phases = Phases()
    worker = core.executor.worker  # type: ignore[attr-defined]
    phases.wrap(core.scheduler, "schedule", "sched")
    phases.wrap(core.scheduler, "update_from_output", "update")
    phases.wrap(worker.tiers, "before_step", "tiers_before")
    phases.wrap(worker.tiers, "after_step", "tiers_after")
    phases.wrap(worker.runner, "_prepare", "prepare")
    phases.wrap(worker.runner.model, "forward", "fwd_launch", gpu=True)
    phases.wrap(worker.runner, "sampler", "sample")
    execute = core.executor.execute
    step = core.step

    def counted_execute(sched_out: Any) -> Any:
        phases.cur["tokens"] = sum(len(s.token_ids) for s in sched_out.seqs
                                   if len(s.token_ids) > 1)
        phases.cur["loads"] = len(sched_out.kv_loads)
        phases.cur["stores"] = len(sched_out.kv_stores)
        start = time.perf_counter()
        out = execute(sched_out)
        phases.cur["exec"] = time.perf_counter() - start
        return out

    def timed_step() -> Any:
        phases.cur, phases.events = {}, []
        start = time.perf_counter()
        out = step()
        wall = time.perf_counter() - start
        if phases.cur.get("tokens"):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            phases.cur["gpu_fwd"] = sum(a.elapsed_time(b) for a, b in phases.events) / 1e3
            rows.append({**phases.cur, "wall": wall})
        else:
            other.append(wall)
        return out

    core.executor.execute = counted_execute  # type: ignore[method-assign]
    core.step = timed_step  # type: ignore[method-assign]


def row(label: str, r: dict[str, Any]) -> str:
    counts = [f"{r.get(k, 0):.0f}" for k in COUNTS]
    times = [f"{r.get(k, 0.0) * 1e3:.1f}" for k in PHASES]
    return f"| {label} | " + " | ".join(counts + times) + " |"


if __name__ == "__main__":
    sys.exit(main())

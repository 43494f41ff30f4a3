"""Load or recompute: per tier hit, is staging the KV faster than computing it again?

    load(n blocks from tier)  ≈ [step_s] + latency_s[tier] + n · block_bytes / bandwidth[tier]
    recompute(n blocks)       ≈ n · block_size / prefill_tokens_per_s

A disk load costs one engine step more while others run (the request waits in WAITING_FOR_KV
for the batch's next step), so short hits are recomputed; into an idle engine it waits only for
its read. Bandwidths, latencies, step time and prefill speed start from priors (or the numbers
a previous run kept beside the disk tier, ``cost.json``) and follow measurements (exponential
moving averages); tests inject their own numbers. A prior is a guess, not a measurement: the
first measurement of a number replaces it (a bandwidth measured on every block written
against a prefill speed still at its prior, say 2000 tokens/s on a CPU that computes 300,
would refuse every load). Numbers given (``cost.json``, tests) were measured: they are
followed from the start. The first ``WARMUP_STEPS`` steps of an engine are not measured
(kernel set-up and allocator growth make them many times slower).
Policies are chosen by name (``cache.kv_load_policy``): ``cost`` or ``always``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

_EWMA = 0.2  # weight of a new observation
_MIN_SECONDS_PER_BYTE = 1e-13  # 10 TB/s: no tier is faster
WARMUP_STEPS = 2  # steps of a fresh engine that say nothing about the next ones
COST_FILE = "cost.json"  # beside the disk tier: the numbers measured by the last run


@dataclass
class CostNumbers:
    """Current estimates (priors until measured). Bandwidths in bytes/s."""

    bandwidth: dict[str, float] = field(
        default_factory=lambda: {"host": 2e9, "disk": 2e8, "remote": 2e8})
    latency_s: dict[str, float] = field(
        default_factory=lambda: {"host": 1e-4, "disk": 1e-3, "remote": 2e-3})
    prefill_tokens_per_s: float = 2000.0
    step_s: float = 0.02


class LoadPolicy:
    """Decides how many of a request's tier-hit blocks to load (the rest is recomputed)."""

    name = "base"

    def __init__(self, block_size: int, block_bytes: int,
                 numbers: CostNumbers | None = None) -> None:
        self.block_size = block_size
        self.block_bytes = max(block_bytes, 1)
        self.numbers = numbers or CostNumbers()
        self._warmup = WARMUP_STEPS
        self._measured = numbers is not None  # else each number is a prior until measured
        self._guesses = {"step_s", "prefill_tokens_per_s",
                         *(f"bandwidth.{t}" for t in self.numbers.bandwidth)}

    def blocks_to_load(self, hits: list[tuple[str, int]], busy: bool = True) -> int:
        """``hits``: consecutive (tier, num_blocks) runs after the device hit, nearest first;
        ``busy``: other sequences run. Returns how many leading blocks to load (a prefix of
        the runs)."""
        raise NotImplementedError

    def pays_off(self, tier: str) -> bool:
        """Whether a block stored in ``tier`` could ever be loaded (rather than recomputed):
        a tier that is not faster than recomputing only costs its writes."""
        return True

    def load_seconds(self, runs: list[tuple[str, int]], busy: bool = True) -> float:
        """Transfer time, plus one engine step when a disk read makes the request wait while
        others run (host loads run in the step that computes the rest of the prompt)."""
        n = self.numbers
        total = n.step_s if busy and any(tier != "host" for tier, _ in runs) else 0.0
        for tier, blocks in runs:
            total += n.latency_s[tier] + blocks * self.block_bytes / n.bandwidth[tier]
        return total

    def recompute_seconds(self, blocks: int) -> float:
        return blocks * self.block_size / self.numbers.prefill_tokens_per_s

    def reload_fraction(self, tier: str, blocks: int) -> float:
        """What getting ``blocks`` back from ``tier`` costs, as a fraction (at most 1) of
        computing them again (TTL pins price a miss with it)."""
        if blocks <= 0:
            return 1.0
        return min(1.0, self.load_seconds([(tier, blocks)]) / self.recompute_seconds(blocks))

    # ------------------------------------------------------------------ measurements
    def _follow(self, name: str, current: float, observed: float) -> float:
        """The estimate after one observation: the observation itself if ``current`` is
        still a prior, else a moving average."""
        if not self._measured and name in self._guesses:
            self._guesses.discard(name)
            return observed
        return current + _EWMA * (observed - current)

    def observe_transfer(self, tier: str, nbytes: int, seconds: float) -> None:
        """A transfer of ``nbytes`` to or from ``tier`` was charged ``seconds`` (transfers
        that overlap share their time: ``worker.tiers.io_time``). Averaged as seconds per
        byte, not as bytes per second: one of several transfers that end together is charged
        almost nothing, which as a rate would swamp the average."""
        bw = self.numbers.bandwidth
        if seconds < 0 or nbytes <= 0 or tier not in bw:
            return
        per_byte = self._follow(f"bandwidth.{tier}", 1.0 / bw[tier], seconds / nbytes)
        bw[tier] = 1.0 / max(per_byte, _MIN_SECONDS_PER_BYTE)

    def observe_step(self, prefill_tokens: int, seconds: float) -> None:
        """One engine step took ``seconds``; it computed ``prefill_tokens`` prompt tokens."""
        n = self.numbers
        if seconds <= 0:
            return
        if self._warmup > 0:
            self._warmup -= 1
            return
        n.step_s = self._follow("step_s", n.step_s, seconds)
        if prefill_tokens >= 4 * self.block_size:  # only prefill-heavy steps say much
            n.prefill_tokens_per_s = self._follow("prefill_tokens_per_s",
                                                  n.prefill_tokens_per_s,
                                                  prefill_tokens / seconds)


class AlwaysLoad(LoadPolicy):
    """Load every hit (tests, benchmarks of the data plane)."""

    name = "always"

    def blocks_to_load(self, hits: list[tuple[str, int]], busy: bool = True) -> int:
        return sum(n for _, n in hits)


class CostLoad(LoadPolicy):
    """Load the prefix of the hit that minimises load + recompute time; never load when
    recomputing everything is at least as fast (a hit never makes TTFT worse)."""

    name = "cost"

    def pays_off(self, tier: str) -> bool:
        """Moving a block must beat computing its tokens: otherwise no hit on ``tier``, however
        long, is ever loaded (a load costs at least its transfer)."""
        n = self.numbers
        return self.block_bytes / n.bandwidth[tier] < self.recompute_seconds(1)

    def blocks_to_load(self, hits: list[tuple[str, int]], busy: bool = True) -> int:
        best, best_saving = 0, 0.0
        for i in range(1, len(hits) + 1):
            blocks = sum(n for _, n in hits[:i])
            saving = self.recompute_seconds(blocks) - self.load_seconds(hits[:i], busy)
            if saving > best_saving:
                best, best_saving = blocks, saving
        return best


_POLICIES: dict[str, type[LoadPolicy]] = {"cost": CostLoad, "always": AlwaysLoad}


def make_load_policy(name: str, block_size: int, block_bytes: int,
                     numbers: CostNumbers | None = None) -> LoadPolicy:
    if name not in _POLICIES:
        raise ValueError(f"kv_load_policy={name!r} is not supported; choose one of "
                         f"{sorted(_POLICIES)}")
    return _POLICIES[name](block_size, block_bytes, numbers)


# ---------------------------------------------------------------------- kept across restarts
def save_cost_numbers(disk_cache_dir: str | None, policy: LoadPolicy) -> None:
    """Keep the policy's measured numbers beside the disk tier (``cost.json``), so that after
    a restart the first disk hits are priced by what this machine measured, not by priors."""
    if not disk_cache_dir:
        return
    path = Path(disk_cache_dir) / COST_FILE
    body = {"block_size": policy.block_size, "block_bytes": policy.block_bytes,
            "numbers": asdict(policy.numbers)}
    tmp = path.with_name(f".{COST_FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(body))
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("could not keep the load policy's numbers in %s: %s", path, e)
        with contextlib.suppress(OSError):
            tmp.unlink()


def load_cost_numbers(disk_cache_dir: str | None, block_size: int,
                      block_bytes: int) -> CostNumbers | None:
    """The numbers a previous run kept for this block layout; None if none (or unusable)."""
    if not disk_cache_dir:
        return None
    try:
        body = json.loads((Path(disk_cache_dir) / COST_FILE).read_text())
        if (body["block_size"], body["block_bytes"]) != (block_size, max(block_bytes, 1)):
            return None
        n, prior = body["numbers"], CostNumbers()
        numbers = CostNumbers(
            bandwidth={**prior.bandwidth, **{k: float(v) for k, v in n["bandwidth"].items()}},
            latency_s={**prior.latency_s, **{k: float(v) for k, v in n["latency_s"].items()}},
            prefill_tokens_per_s=float(n["prefill_tokens_per_s"]), step_s=float(n["step_s"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if min(*numbers.bandwidth.values(), numbers.prefill_tokens_per_s, numbers.step_s) <= 0:
        return None
    return numbers

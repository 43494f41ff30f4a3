"""The tier codec's error bound; blocks sent through a real tier data plane and back; and
an engine on the embedded model whose prompts come back from the tiers.

    plane = data_plane(tmp_path, "int8", torch.bfloat16, "cpu")
    before, after = round_trip(plane, "host")   # device -> host -> other device blocks
    assert max(error_ratio(before, after, "int8")) <= 1.0

    cold, warm = cold_then_warm(start(tier_kv_codec="int8", host_cache_gib=HOST_GIB), prompts)
    compare(cold, warm, "int8", "host")
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from encore.configs.loading import build_config
from encore.protocol.messages import EngineRequest, KVTransfer, SamplingParams, SchedulerOutput
from encore.scheduler.engine import EngineCore
from encore.server.tokenizer import load_tokenizer
from encore.worker.executor import InprocExecutor
from encore.worker.loader import default_gguf_path
from encore.worker.tiers.data_plane import TierDataPlane

QMAX = {"int8": 255, "int4": 15}
LAYERS, HEADS, DIM, BS = 5, 2, 16, 16


def kv_like(shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu",
            seed: int = 0) -> torch.Tensor:
    """Random ``[..., 2, bs, heads, dim]`` KV with what real keys have: per-channel offsets
    and a few large channels (values: plain noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    dim = shape[-1]
    offsets = torch.randn(dim, generator=g) * 4
    offsets[:: max(1, dim // 4)] += 40.0  # outlier channels, far from zero
    x[..., 0, :, :, :] += offsets
    return x.to(dtype=dtype, device=device)


def error_ratio(before: torch.Tensor, after: torch.Tensor, codec: str) -> tuple[float, float]:
    """The largest error of keys (per channel) and values (per token), as a fraction of the
    codec's bound: half a step, a step being ``(max - min + ulp16(min)) / qmax`` (fp16 zero
    rounded down, scale up), plus the model dtype's rounding of the decoded value."""
    eps = torch.finfo(before.dtype).eps
    x, y = before.double(), after.double()
    k, v = x[..., 0, :, :, :], x[..., 1, :, :, :]
    out = []
    for ref, got, dim in ((k, y[..., 0, :, :, :], -3), (v, y[..., 1, :, :, :], -1)):
        lo, hi = ref.amin(dim, keepdim=True), ref.amax(dim, keepdim=True)
        step = (hi - lo + lo.abs() * 2**-10 + 2**-24) / QMAX[codec] * (1 + 2**-10)
        bound = step / 2 + (ref.abs() + step / 2) * eps / 2 + 1e-7
        out.append(((got - ref).abs() / bound).max().item())
    return out[0], out[1]


def data_plane(tmp: Path, codec: str, dtype: torch.dtype, device: str,
               blocks: int = 12) -> TierDataPlane:
    """A data plane over random KV (``LAYERS`` layers of ``blocks`` blocks) with a host tier
    and a disk tier in ``tmp``."""
    config = build_config(overrides={"host_cache_gib": 0.01, "disk_cache_dir": str(tmp),
                                     "tier_kv_codec": codec, "device": device})
    kv = [kv_like((blocks, 2, BS, HEADS, DIM), dtype, device, seed=layer).transpose(0, 1)
          .contiguous() for layer in range(LAYERS)]
    return TierDataPlane(config, kv, b"f" * 32)


def round_trip(plane: TierDataPlane, via: str, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Device blocks 0..n-1 stored in ``via`` (host or disk), then loaded into blocks
    n..2n-1: both as ``[n, layers, 2, bs, heads, dim]``."""
    keys = [bytes([i + 1]) * 32 for i in range(n)]
    _step(plane, SchedulerOutput(1, kv_stores=[
        KVTransfer(i + 1, keys[i], "device", i, via, i) for i in range(n)]))
    for layer in plane.blocks.kv:
        layer[:, n:2 * n].zero_()
    _step(plane, SchedulerOutput(2, kv_loads=[
        KVTransfer(100 + i, keys[i], via, i, "device", n + i) for i in range(n)]))
    gather = plane.blocks.gather
    layers = (0, plane.blocks.num_layers)
    dev = plane.blocks.device
    return (gather(torch.arange(n, device=dev), layers).cpu(),
            gather(torch.arange(n, 2 * n, device=dev), layers).cpu())


def _step(plane: TierDataPlane, step: SchedulerOutput) -> None:
    """Run a step's tier ops (no forward pass) until every op is done, and all succeeded."""
    done, copies = plane.before_step(step)
    if copies is not None:
        copies.wait_all()
    want = {op.op_id for op in (*step.kv_stores, *step.kv_loads)}
    deadline = time.monotonic() + 30
    while {d.op_id for d in done} != want and time.monotonic() < deadline:
        finished, _ = plane.after_step(idle=True)
        done.extend(finished)
    if plane.blocks.stream is not None:
        torch.cuda.synchronize()
    assert all(d.ok for d in done) and {d.op_id for d in done} == want, done


# ---------------------------------------------------------------------------- engine level
TOPICS = ["the harbor at dawn", "a violin maker's workshop", "glaciers in the far north",
          "the history of copper mining", "an orchard after the storm",
          "a night train across the desert", "the old lighthouse keeper",
          "bees and the meadow in June"]
MAX_TOKENS = 4
# per codec: the largest and the mean first-token |logprob error| (nats) allowed, and how
# many of the 8 prompts must give the same greedy tokens (all MAX_TOKENS of them). Measured
# on SmolLM2 (fp32, x86): int8 0.026 / 0.003, 8 of 8; int4 0.42 / 0.055, 8 of 8.
BOUNDS = {"int8": (0.05, 0.01, 7), "int4": (0.75, 0.15, 5)}
HOST_GIB = 64 * 737_280 / 1024**3  # 64 uncompressed SmolLM2 blocks (fp32)


def story_prompts() -> list[list[int]]:
    """Eight distinct English prompts of 5 full blocks and a bit (85-92 tokens)."""
    tok = load_tokenizer(str(default_gguf_path()))
    out: list[list[int]] = []
    for topic in TOPICS:
        text = (f"Here is a short story about {topic}. It begins quietly, with a description "
                f"of the place and the people who live there, their habits, their work, and "
                f"the small worries that fill their days. Then something changes: ")
        out.append(tok.encode(text * 2)[:85 + len(out)])
    return out


def start(**overrides: Any) -> EngineCore:
    """The embedded model (fp32) with a 12-block device pool, loading every tier hit."""
    base = {"dtype": "float32", "num_device_blocks": 12, "max_num_batched_tokens": 512,
            "kv_load_policy": "always"}
    config = build_config(overrides={**base, **overrides})
    core = EngineCore(config, InprocExecutor(config))
    core.start()
    return core


Run = tuple[list[int], int, dict[int, float]]  # greedy tokens, cached tokens, first logprobs


def run(core: EngineCore, prompt: list[int], rid: str) -> Run:
    """One greedy request stepped to its end."""
    return run_all(core, [prompt], rid)[0]


def run_all(core: EngineCore, prompts: list[list[int]], tag: str) -> list[Run]:
    """Greedy requests submitted together, stepped to their end; the engine's invariants
    checked after."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                            logprobs=5)
    rids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(rids, prompts, strict=True):
        core.add_request(EngineRequest(rid, prompt, params, arrival_time=time.time()))
    runs: dict[str, Run] = {rid: ([], 0, {}) for rid in rids}
    while core.has_work():
        for out in core.step():
            assert out.error is None, out.error
            tokens, _, first = runs[out.request_id]
            if out.logprobs and not tokens:
                first.update({t.token_id: t.logprob for t in out.logprobs[0].top})
            tokens.extend(out.new_token_ids)
            runs[out.request_id] = (tokens, out.num_cached_tokens, first)
    core.scheduler.check_integrity()
    return [runs[rid] for rid in rids]


def cold_then_warm(core: EngineCore, prompts: list[list[int]]) -> tuple[list[Run], list[Run]]:
    """Each prompt cold, in turn (each pushes the earlier ones' blocks out of the 12-block
    device pool into the lower tiers), then each again (its prefix loaded from them)."""
    cold = [run(core, p, f"cold{i}") for i, p in enumerate(prompts)]
    warm = [run(core, p, f"warm{i}") for i, p in enumerate(prompts)]
    assert all(c[1] == 0 for c in cold)
    return cold, warm


def compare(cold: list[Run], warm: list[Run], codec: str, where: str) -> None:
    """Greedy agreement and first-token logprob error of ``warm`` against ``cold`` (the
    uncompressed reference), printed, and held to ``BOUNDS``."""
    agree = sum(c[0] == w[0] for c, w in zip(cold, warm, strict=True))
    errors = []
    for (_, _, lp_cold), (_, _, lp_warm) in zip(cold, warm, strict=True):
        top = max(lp_cold, key=lp_cold.__getitem__)
        errors.append(abs(lp_warm.get(top, -20.0) - lp_cold[top]))
    worst, mean, floor = BOUNDS[codec]
    print(f"\n{codec} via {where}: greedy agreement {agree}/{len(cold)}, first-token logprob "
          f"error max {max(errors):.4f} mean {sum(errors) / len(errors):.4f} (bounds {worst}, "
          f"{mean})")
    assert all(w[1] >= 64 for w in warm), "every warm prompt loaded its prefix"
    assert agree >= floor
    assert max(errors) <= worst and sum(errors) / len(errors) <= mean

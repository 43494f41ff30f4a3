"""Prefill attention's tiles on this GPU, against torch SDPA's flash kernel.

    python bench/prefill_tune.py [--lens 4096,16384] [--json out.json]

For one sequence of L new tokens (no prefix, causal; llama-3-8b's attention shape: 32 query
heads, 8 KV heads, head_dim 128, bf16, pages of 16) times ``_prefill_kernel`` under every
(BLOCK_M, BLOCK_N, num_warps, num_stages) of a grid, and torch SDPA with the flash backend
on dense tensors of the same problem (KV heads repeated to 32: flash takes no GQA). Median
of triton.testing.do_bench. Prints each config's ms and its share of SDPA's speed, the best
five again with the row tiles in reverse order (``HEAVY_FIRST``), the best per length last;
the wrapper's current choice is marked.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from encore.kernels._common import dot_precision, next_pow2  # noqa: E402
from encore.kernels.decode_attention import LOG2E  # noqa: E402
from encore.kernels.prefill_attention import _prefill_kernel, tiles  # noqa: E402

H, HK, D, BS, DT = 32, 8, 128, 16, torch.bfloat16


def case(length: int):
    blocks = triton.cdiv(length, BS)
    kv = torch.randn(2, blocks + 1, BS, HK, D, device="cuda", dtype=DT)
    table = (torch.randperm(blocks + 1, device="cuda")[:blocks].int())[None]
    q = torch.randn(length, H, D, device="cuda", dtype=DT)
    qsl = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    lens = torch.tensor([length], dtype=torch.int32, device="cuda")
    return q, kv, table, qsl, lens


def run_config(length, inputs, block_m, block_n, warps, stages, heavy_first=False):
    q, kv, table, qsl, lens = inputs
    out = torch.empty_like(q)
    group = H // HK
    grid = (triton.cdiv(length * group, block_m), 1, HK)

    def call():
        _prefill_kernel[grid](
            q, kv, table, qsl, lens, lens, out, q.stride(0), q.stride(1),
            kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), table.stride(0),
            out.stride(0), out.stride(1), D ** -0.5 * LOG2E, 1.0, D, group,
            BLOCK_SIZE=BS, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=next_pow2(D),
            UPCAST=False, PREC=dot_precision(DT), HAS_POS=False, HEAVY_FIRST=heavy_first,
            num_warps=warps, num_stages=stages)
    call()
    return triton.testing.do_bench(call, return_mode="median")


def sdpa_ms(length: int) -> float:
    q = torch.randn(1, H, length, D, device="cuda", dtype=DT)
    k = torch.randn(1, H, length, D, device="cuda", dtype=DT)
    v = torch.randn(1, H, length, D, device="cuda", dtype=DT)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q, k, v, is_causal=True)
        fn()
        return triton.testing.do_bench(fn, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lens", default="4096,16384")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    current = tiles(D, False, torch.device("cuda"))
    grid = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)))
    results = {}
    for length in map(int, args.lens.split(",")):
        inputs = case(length)
        ref = sdpa_ms(length)
        flops = 4 * H * D * length * (length + 1) / 2
        rows = []
        for bm, bn, w, s in grid:
            try:
                ms = run_config(length, inputs, bm, bn, w, s)
            except Exception as e:  # out of shared memory, registers: not a candidate
                print(f"L={length} {bm}x{bn} w{w} s{s}: {type(e).__name__}", flush=True)
                continue
            mark = " <- current" if (bm, bn, w, s) == current else ""
            rows.append({"block_m": bm, "block_n": bn, "warps": w, "stages": s, "ms": ms,
                         "tflops": flops / ms / 1e9, "of_sdpa": ref / ms})
            print(f"L={length} {bm:>3}x{bn:<3} w{w} s{s}: {ms:8.3f} ms "
                  f"{flops / ms / 1e9:6.1f} TFLOP/s {100 * ref / ms:5.1f}% of SDPA{mark}",
                  flush=True)
        rows.sort(key=lambda r: r["ms"])
        for r in rows[:5]:  # the best five again with the heaviest row tiles launched first
            ms = run_config(length, inputs, r["block_m"], r["block_n"], r["warps"],
                            r["stages"], heavy_first=True)
            r["heavy_first_ms"], r["heavy_first_of_sdpa"] = ms, ref / ms
            print(f"L={length} {r['block_m']:>3}x{r['block_n']:<3} w{r['warps']} "
                  f"s{r['stages']} heavy first: {ms:8.3f} ms {100 * ref / ms:5.1f}% of SDPA",
                  flush=True)
        results[length] = {"sdpa_ms": ref, "sdpa_tflops": flops / ref / 1e9, "best": rows[:5],
                           "current": [r for r in rows if (r["block_m"], r["block_n"],
                                       r["warps"], r["stages"]) == current]}
    print(f"\n{torch.cuda.get_device_name()}  prefill attention, one sequence, no prefix")
    for length, r in results.items():
        b = r["best"][0]
        cur = r["current"][0] if r["current"] else None
        print(f"L={length}: SDPA flash {r['sdpa_ms']:.3f} ms ({r['sdpa_tflops']:.0f} TFLOP/s); "
              f"best {b['block_m']}x{b['block_n']} w{b['warps']} s{b['stages']} "
              f"{b['ms']:.3f} ms = {100 * b['of_sdpa']:.1f}% (heavy first "
              f"{100 * b['heavy_first_of_sdpa']:.1f}%)"
              + (f"; current {cur['ms']:.3f} ms = {100 * cur['of_sdpa']:.1f}%" if cur else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

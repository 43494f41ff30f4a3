"""GPU micro-benchmarks of the Triton kernels, next to the card's own ceilings.

    python bench/kernel_bench.py [--quick]

Measures (median of triton.testing.do_bench, which flushes L2 between repetitions):
  * ceilings: device-to-device copy GB/s (bytes read + written), bf16 matmul TFLOP/s;
  * decode attention achieved GB/s (K + V bytes of every context read once) over a
    batch x context grid, with split-K on (auto) and off, Llama-3-8B shape per layer
    (32 query heads, 8 KV heads, head_dim 128, block 16, bf16);
  * prefill attention TFLOP/s (causal: 4 * H * D * visible (q, k) pairs), with and
    without a cached prefix, next to torch SDPA on dense tensors of the same shape;
  * KV write, RoPE, block gather, RMSNorm achieved GB/s;
  * fp8 decode attention (``--only fp8``): bf16 vs fp8 e4m3 pages over tiles, stages, warps
    and the MMA dtype (``FP8_VARIANTS``);
  * the add + RMSNorm folded into the following batch-1 GEMV (``--only fold``), a prototype
    kept here to measure whether the fold pays: every program recomputes the row's norm (it
    needs all of it) and one writes the new residual (out of place), against rmsnorm + GEMV;
  * the tier codec (``--only codec``): a layer group of a host load (blocks x 4 layers of
    llama-3-8b) decoded into the pool by the torch codec + index_copy, by the fused kernel,
    and the uncompressed scatter; likewise the stores' gather + encode.
Prints one table last. Needs CUDA; not part of pytest.

    python bench/kernel_bench.py --only fp8,codec
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

from encore.kernels.block_copy import gather_blocks
from encore.kernels.decode_attention import decode_attention
from encore.kernels.kv_codec import decode_scatter, gather_encode
from encore.kernels.kv_write import kv_write
from encore.kernels.prefill_attention import prefill_attention
from encore.kernels.reference import rope_inv_freq
from encore.kernels.rmsnorm import rmsnorm
from encore.kernels.rope import layer_pointers, rope_qk

H, HK, D, BS = 32, 8, 128, 16
DT = torch.bfloat16
ROWS: list[tuple[str, str, str, str]] = []  # (kernel, shape, metric, value)


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def row(kernel: str, shape: str, metric: str, value: float, extra: str = "") -> None:
    text = f"{value:8.1f}" + (f"  ({extra})" if extra else "")
    ROWS.append((kernel, shape, metric, text))
    print(f"{kernel:<22} {shape:<34} {metric:<10} {text}", flush=True)


def ceilings() -> None:
    n = 1 << 30
    src = torch.randn(n // 2, device="cuda", dtype=DT)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    row("d2d copy", "1 GiB", "GB/s", 2 * n / ms / 1e6)
    a = torch.randn(8192, 8192, device="cuda", dtype=DT)
    b = torch.randn(8192, 8192, device="cuda", dtype=DT)
    ms = bench_ms(lambda: a @ b)
    row("bf16 matmul", "8192^3", "TFLOP/s", 2 * 8192**3 / ms / 1e9)


def paged(seq_lens: list[int]):
    """A shuffled paged cache holding exactly the given contexts."""
    need = [triton.cdiv(n, BS) for n in seq_lens]
    kv = torch.randn(2, sum(need) + 1, BS, HK, D, device="cuda", dtype=DT)
    ids = torch.randperm(sum(need) + 1, device="cuda")[: sum(need)].int()
    tables = torch.zeros(len(seq_lens), max(need), dtype=torch.int32, device="cuda")
    at = 0
    for b, nb in enumerate(need):
        tables[b, :nb] = ids[at : at + nb]
        at += nb
    return kv, tables


def decode_case(b: int, ctx: int) -> None:
    kv_bytes = 2 * b * ctx * HK * D * 2
    kv, tables = paged([ctx] * b)
    q = torch.randn(b, H, D, device="cuda", dtype=DT)
    lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    ms = bench_ms(lambda: decode_attention(q, kv, tables, lens, D**-0.5, ctx))
    ms1 = bench_ms(lambda: decode_attention(q, kv, tables, lens, D**-0.5, ctx, num_splits=1))
    row("decode attention", f"B={b} ctx={ctx}", "GB/s", kv_bytes / ms / 1e6,
        f"{ms * 1e3:.0f} us; no split {kv_bytes / ms1 / 1e6:.0f} GB/s")


def prefill_case(batch: int, qlen: int, prefix: int) -> None:
    seq = qlen + prefix
    kv, tables = paged([seq] * batch)
    q = torch.randn(batch * qlen, H, D, device="cuda", dtype=DT)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * qlen
    lens = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
    ms = bench_ms(lambda: prefill_attention(q, kv, tables, qsl, lens, D**-0.5, qlen))
    flops = 4 * H * D * batch * (qlen * prefix + qlen * (qlen + 1) / 2)
    extra = f"{ms * 1e3:.0f} us"
    if prefix == 0:  # dense flash-attention baseline of the same causal problem
        qd = torch.randn(batch, H, qlen, D, device="cuda", dtype=DT)
        kd = torch.randn(batch, HK, qlen, D, device="cuda", dtype=DT)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        ms_ref = bench_ms(lambda: sdpa(qd, kd, kd, is_causal=True, enable_gqa=True))
        extra += f"; torch SDPA dense {flops / ms_ref / 1e9:.0f} TFLOP/s"
    row("prefill attention", f"B={batch} q={qlen} prefix={prefix}", "TFLOP/s",
        flops / ms / 1e9, extra)


# (name, cache, block_n, launch options) of the fp8 sweep; "bf16 mma" is the widening before
# FP16_MMA (fp8 -> bf16 through fp32)
FP8_VARIANTS = [
    ("bf16 n=64", "bf16", 64, {}),
    ("bf16 n=64 s4", "bf16", 64, {"num_stages": 4}),
    ("fp8 n=64 bf16 mma", "fp8", 64, {"FP16_MMA": False}),
    ("fp8 n=64", "fp8", 64, {}),
    ("fp8 n=64 s4", "fp8", 64, {"num_stages": 4}),
    ("fp8 n=64 s5", "fp8", 64, {"num_stages": 5}),
    ("fp8 n=64 w8", "fp8", 64, {"num_warps": 8}),
    ("fp8 n=128", "fp8", 128, {}),
    ("fp8 n=128 w8", "fp8", 128, {"num_warps": 8}),
    ("fp8 n=128 s4 w8", "fp8", 128, {"num_stages": 4, "num_warps": 8}),
]


def decode_fp8_case(b: int, ctx: int) -> None:
    """bf16 pages vs fp8 pages (half the bytes) over tile sizes and launch options; GB/s of
    the bytes each actually reads."""
    kv, tables = paged([ctx] * b)
    caches = {"bf16": kv, "fp8": kv.to(torch.float8_e4m3fn)}
    q = torch.randn(b, H, D, device="cuda", dtype=DT)
    lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    pages = 2 * b * ctx * HK * D  # elements of K and V read
    for name, cache, n, launch in FP8_VARIANTS:
        try:
            ms = bench_ms(lambda c=caches[cache], n=n, launch=launch: decode_attention(
                q, c, tables, lens, D**-0.5, ctx, block_n=n, launch=launch))
        except Exception as e:  # a launch option the card cannot hold (shared memory)
            print(f"decode {name} B={b} ctx={ctx}: {type(e).__name__}: {e}"[:200], flush=True)
            continue
        size = caches[cache].element_size()
        row(f"decode {name}", f"B={b} ctx={ctx}", "us", ms * 1e3,
            f"{pages * size / ms / 1e6:.0f} GB/s")


def codec_case(blocks: int, codec: str) -> None:
    """One layer group (4 layers) of ``blocks`` llama-3-8b blocks: decode into the pool
    (torch codec + index_copy, fused kernel), encode out of it (gather + torch codec, fused);
    the uncompressed scatter for reference."""
    from encore.worker.tiers.codec import KVCodec

    caches = [torch.randn(2, 4096, BS, HK, D, device="cuda", dtype=DT) for _ in range(4)]
    ptrs = layer_pointers(caches)
    ids = torch.randperm(4096, device="cuda")[:blocks]
    bits = {"int8": 8, "int4": 4}[codec]
    twin = KVCodec(codec, (2, BS, HK, D), DT)

    def gather() -> torch.Tensor:
        return torch.stack([c.index_select(1, ids).transpose(0, 1) for c in caches], dim=1)

    def scatter(data: torch.Tensor) -> None:
        for i, c in enumerate(caches):
            c.index_copy_(1, ids, data[:, i].transpose(0, 1))

    raw = gather()
    payload = twin.encode(raw)
    rows = {
        "scatter bf16 (none)": lambda: scatter(raw),
        f"decode {codec} torch": lambda: scatter(twin.decode(payload)),
        f"decode {codec} fused": lambda: decode_scatter(payload, caches, ptrs, ids, bits),
        "gather bf16 (none)": gather,
        f"encode {codec} torch": lambda: twin.encode(gather()),
        f"encode {codec} fused": lambda: gather_encode(caches, ptrs, ids, bits),
    }
    for name, fn in rows.items():
        row(f"tier {name}", f"{blocks} blocks x 4 layers", "us", bench_ms(fn) * 1e3)


@triton.jit
def _gemv_norm_kernel(x_ptr, res_ptr, res_out_ptr, nw_ptr, w_ptr, out_ptr, N, K, eps,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = W @ (rmsnorm(x + res) * nw); program 0 also stores x + res (rounded) to res_out."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = tl.arange(0, BLOCK_K)
    sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c = k0 + cols
        r = (tl.load(x_ptr + c, mask=c < K, other=0.0).to(tl.float32)
             + tl.load(res_ptr + c, mask=c < K, other=0.0).to(tl.float32))
        r = r.to(res_ptr.dtype.element_ty).to(tl.float32)
        sq += r * r
    rstd = tl.rsqrt(tl.sum(sq, 0) / K + eps)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        c = k0 + cols
        cmask = c < K
        r = (tl.load(x_ptr + c, mask=cmask, other=0.0).to(tl.float32)
             + tl.load(res_ptr + c, mask=cmask, other=0.0).to(tl.float32))
        r_ty = r.to(res_ptr.dtype.element_ty)
        if tl.program_id(0) == 0:
            tl.store(res_out_ptr + c, r_ty, mask=cmask)
        h = (r_ty.to(tl.float32) * rstd * tl.load(nw_ptr + c, mask=cmask, other=0.0)
             .to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_rows + c[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc += w.to(tl.float32) * h[None, :]
    tl.store(out_ptr + rows, tl.sum(acc, 1).to(out_ptr.dtype.element_ty), mask=rmask)


def fold_case(n: int, k: int) -> None:
    """rmsnorm (with residual) + the GEMV against the GEMV with the norm in its prologue, at
    a few tiles; us per pair (L2 flushed by do_bench between repetitions)."""
    from encore.kernels.gemv import gemv

    x = torch.randn(1, k, device="cuda", dtype=DT)
    res = torch.randn(1, k, device="cuda", dtype=DT)
    nw = torch.randn(k, device="cuda", dtype=DT)
    w = torch.randn(n, k, device="cuda", dtype=DT) / k**0.5
    out = torch.empty(1, n, device="cuda", dtype=DT)
    res_out = torch.empty_like(res)
    gemv(rmsnorm(x, nw, 1e-5, res.clone())[0], w)  # autotune outside the timing

    def unfused() -> None:
        h, _ = rmsnorm(x, nw, 1e-5, res)
        gemv(h, w, out=out)

    row("fold: rmsnorm+gemv", f"N={n} K={k}", "us", bench_ms(unfused) * 1e3)
    row("fold: gemv alone", f"N={n} K={k}", "us",
        bench_ms(lambda: gemv(x, w, out=out)) * 1e3)
    for bn, bk, warps in [(4, 1024, 4), (8, 512, 4), (16, 512, 8), (32, 256, 8)]:
        def fused(bn=bn, bk=bk, warps=warps) -> None:
            _gemv_norm_kernel[(triton.cdiv(n, bn),)](x, res, res_out, nw, w, out, n, k, 1e-5,
                                                     BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
        row("fold: gemv with norm", f"N={n} K={k} {bn}x{bk} w{warps}", "us",
            bench_ms(fused) * 1e3)


def run_safely(fn, *args) -> None:
    """One failing case (out of memory, compile error) is reported, not fatal."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - a benchmark grid keeps going
        ROWS.append((fn.__name__, str(args), "FAILED", type(e).__name__))
        print(f"{fn.__name__}{args} FAILED: {e!r}"[:400], flush=True)
    torch.cuda.empty_cache()


def small_kernels() -> None:
    t = 8192
    kv = torch.randn(2, t // BS + 8, BS, HK, D, device="cuda", dtype=DT)
    k = torch.randn(t, HK, D, device="cuda", dtype=DT)
    slots = torch.randperm(kv.shape[1] * BS, device="cuda")[:t]
    ms = bench_ms(lambda: kv_write(kv, k, k, slots))
    row("kv write", f"T={t} Hk={HK} D={D}", "GB/s", 4 * k.numel() * 2 / ms / 1e6)
    qkv = torch.randn(t, (H + 2 * HK) * D, device="cuda", dtype=DT)
    q, kk = qkv[:, : H * D].view(t, H, D), qkv[:, H * D : (H + HK) * D].view(t, HK, D)
    pos = torch.arange(t, device="cuda")
    inv = rope_inv_freq(D, 500000.0).cuda()
    ms = bench_ms(lambda: rope_qk(q, kk, pos, inv))
    row("rope q/k", f"T={t} H={H} Hk={HK}", "GB/s", 2 * (H + HK) * t * D * 2 / ms / 1e6)
    pool = torch.randn(32, 2, 4096, BS, HK, D, device="cuda", dtype=DT)  # 32 layers
    ids = torch.randperm(4096, device="cuda")[:256]
    out = torch.empty(256, 32, 2, BS, HK, D, device="cuda", dtype=DT)
    ms = bench_ms(lambda: gather_blocks(pool, ids, 2, out=out))
    row("block gather", "256 blocks x 32 layers", "GB/s", 2 * out.numel() * 2 / ms / 1e6)
    x = torch.randn(t, 4096, device="cuda", dtype=DT)
    res = torch.randn_like(x)
    w = torch.randn(4096, device="cuda", dtype=DT)
    ms = bench_ms(lambda: rmsnorm(x, w, 1e-5, res))
    row("rmsnorm + residual", f"T={t} hidden=4096", "GB/s", 4 * x.numel() * 2 / ms / 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    ap.add_argument("--only", default="ceilings,decode,prefill,small",
                    help="comma-separated: ceilings, decode, prefill, small, fp8, fold, codec")
    args = ap.parse_args()
    quick, only = args.quick, set(args.only.split(","))
    if not torch.cuda.is_available():
        sys.exit("bench/kernel_bench.py needs a CUDA GPU")
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {triton.__version__}", flush=True)
    torch.manual_seed(0)
    if "ceilings" in only:
        ceilings()
    if "decode" in only:
        for b in [1, 8, 64] if quick else [1, 8, 32, 128]:
            for ctx in [1024, 8192] if quick else [512, 2048, 8192, 32768]:
                run_safely(decode_case, b, ctx)
    if "fp8" in only:
        for b, ctx in [(1, 4096), (64, 1024), (256, 1024), (512, 1024), (256, 2048)]:
            run_safely(decode_fp8_case, b, ctx)
    if "prefill" in only:
        prefill_cases = ([(1, 2048, 0), (4, 512, 3000)] if quick else
                         [(1, 512, 0), (1, 4096, 0), (4, 2048, 0), (8, 256, 4000),
                          (1, 1024, 15000)])
        for case in prefill_cases:
            run_safely(prefill_case, *case)
    if "small" in only:
        run_safely(small_kernels)
    if "fold" in only:
        for n, k in [(6144, 4096), (28672, 4096)]:  # llama-3-8b qkv, gate_up
            run_safely(fold_case, n, k)
    if "codec" in only:
        for blocks in (32, 256):
            for codec in ("int8", "int4"):
                run_safely(codec_case, blocks, codec)
    print(f"\n# {torch.cuda.get_device_name()}")
    print(f"{'kernel':<22} {'shape':<34} {'metric':<10} value")
    for r in ROWS:
        print(f"{r[0]:<22} {r[1]:<34} {r[2]:<10} {r[3]}")


if __name__ == "__main__":
    main()

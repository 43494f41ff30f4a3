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
  * the batch-1 GEMV folds (``--only fold``): RMSNorm into qkv, RMSNorm and SiLU x up into
    gate_up, the residual add into o_proj and down_proj, against the separate kernels;
    and (``--only pdl``) a chain of them in a CUDA graph, plain vs programmatic dependent
    launches;
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


def fold_case(n: int, k: int, fold: str) -> None:
    """A batch-1 linear of llama-3-8b with its neighbour folded in (``kernels/gemv.py``)
    against the separate kernels, us (L2 flushed by do_bench between repetitions):
    norm (qkv), norm+swiglu (gate_up: n is the output I), residual (o_proj, down_proj)."""
    from encore.kernels.activation import silu_mul
    from encore.kernels.gemv import gemv

    rows = 2 * n if "swiglu" in fold else n
    x = torch.randn(1, k, device="cuda", dtype=DT)
    nw = torch.rand(k, device="cuda", dtype=DT) + 0.5
    w = torch.randn(rows, k, device="cuda", dtype=DT) / k**0.5
    res = torch.zeros(1, n, device="cuda", dtype=DT)
    norm = {"norm_weight": nw, "eps": 1e-5} if "norm" in fold else {}
    if fold == "residual":
        def separate() -> None:
            res.add_(gemv(x, w))

        def folded() -> None:
            gemv(x, w, residual=res)
    else:
        def separate() -> None:
            y = gemv(rmsnorm(x, nw, 1e-5)[0], w)
            if "swiglu" in fold:
                silu_mul(y)

        def folded() -> None:
            gemv(x, w, swiglu="swiglu" in fold, **norm)
    separate(), folded()  # autotune outside the timing
    shape = f"N={rows} K={k}"
    row("gemv alone", shape, "us", bench_ms(lambda: gemv(x, w)) * 1e3)
    row(f"gemv, {fold} separate", shape, "us", bench_ms(separate) * 1e3)
    row(f"gemv, {fold} folded", shape, "us", bench_ms(folded) * 1e3)


def pdl_case(layers: int = 8) -> None:
    """A batch-1 decoder's four folded GEMVs (llama-3-8b, ``layers`` layers of distinct
    weights, 3.5 GB at 8: no L2 reuse) captured in one CUDA graph, launched plainly and as
    programmatic dependents (PDL); us per replay and the weights' GB/s."""
    from encore.kernels.gemv import gemv

    d, inter, qkv = 4096, 14336, 6144
    ws = [(torch.randn(qkv, d, device="cuda", dtype=DT) / 64,
           torch.randn(d, d, device="cuda", dtype=DT) / 64,
           torch.randn(2 * inter, d, device="cuda", dtype=DT) / 64,
           torch.randn(d, inter, device="cuda", dtype=DT) / 120) for _ in range(layers)]
    nw = torch.rand(d, device="cuda", dtype=DT) + 0.5
    res = torch.randn(1, d, device="cuda", dtype=DT)
    nbytes = sum(w.numel() * w.element_size() for ws_ in ws for w in ws_)

    def forward(pdl: bool) -> None:
        for w_qkv, w_o, w_gu, w_down in ws:
            y = gemv(res, w_qkv, norm_weight=nw, eps=1e-5, pdl=pdl)
            gemv(y[:, :d], w_o, residual=res, pdl=pdl)
            a = gemv(res, w_gu, norm_weight=nw, eps=1e-5, swiglu=True, pdl=pdl)
            gemv(a, w_down, residual=res, pdl=pdl)

    for pdl in (False, True):
        forward(pdl)  # autotune, outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward(pdl)
        ms = bench_ms(graph.replay)
        row(f"gemv chain, pdl={pdl}", f"{layers} layers x 4 folded", "us",
            ms * 1e3, f"{nbytes / ms / 1e6:.0f} GB/s")


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
                    help="comma-separated: ceilings, decode, prefill, small, fp8, fold, pdl, "
                         "codec")
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
        for n, k, fold in [(6144, 4096, "norm"), (14336, 4096, "norm+swiglu"),
                           (4096, 4096, "residual"), (4096, 14336, "residual")]:  # llama-3-8b
            run_safely(fold_case, n, k, fold)
    if "pdl" in only:
        run_safely(pdl_case)
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

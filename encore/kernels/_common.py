"""Shared helpers of the kernel wrappers: argument checks, one interpreter workaround, and
programmatic dependent launch."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# fp8 KV caches (``cache.kv_cache_dtype``): values stored as x / scale, saturated to the
# format's largest finite value (e4m3 has no infinity; e5m2's would poison a softmax)
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
KV_DTYPES = (*FLOAT_DTYPES, *FP8_MAX)


def fp8_max(dtype: torch.dtype) -> float:
    """The saturation bound of an fp8 cache dtype; 0.0 (no clamp) for the float dtypes."""
    return FP8_MAX.get(dtype, 0.0)


def dot_upcast(device: torch.device) -> bool:
    """Whether tl.dot operands must be upcast to fp32 before the product.

    Triton's CPU interpreter (TRITON_INTERPRET=1, 3.8) returns garbage for bf16 x bf16 dots;
    fp32 operands are exact there. On a GPU the native bf16/fp16 tensor-core dot is used.
    """
    return device.type == "cpu"


@functools.cache
def _pdl_capable(index: int) -> bool:
    return (os.environ.get("ENCORE_PDL", "1") != "0"
            and torch.cuda.get_device_capability(index)[0] >= 9)


def pdl_launch(device: torch.device, on: bool = True) -> dict:
    """Launch options for a kernel with a ``pdl_gate``: on Hopper or newer (and ``on``) it is
    launched as a programmatic dependent (PDL) of the kernel before it in the stream, so its
    programs are resident, and may prefetch, before that kernel ends (inside CUDA graphs too:
    the ~1-2 us between two kernels of a batch-1 decode step). ``ENCORE_PDL=0`` turns it off
    (measurements); off on the interpreter.

    A kernel whose gate is its first statement is safe under any caller. One that reads
    inputs before its gate takes ``on`` from its caller's ``pdl`` argument (default off):
    the caller promises that the kernel launched just before never writes those inputs."""
    index = device.index if device.index is not None else 0
    if on and device.type == "cuda" and _pdl_capable(index):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def pdl_gate(PDL: tl.constexpr):
    """Under PDL: wait until the kernel before has ended and its writes are visible, then
    let the kernel after this one launch. Before the gate a kernel may read anything except
    what the kernel just before it writes (that one may still be running; every earlier one
    has ended, since each lets its dependents launch only after its own gate)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get an IEEE fp32 dot (tf32 would cost ~3e-4 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def mma(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """a @ b with fp32 accumulation (operands upcast when UPCAST, see dot_upcast)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


@triton.jit
def fp8_scaled(x, inv_scale, FP8_MAX: tl.constexpr):
    """``x`` as a cache stores it: an fp8 cache (FP8_MAX > 0) holds x / scale saturated to
    +-FP8_MAX (fp32, cast at the store); any other cache x itself."""
    if FP8_MAX > 0:
        x = tl.clamp(x.to(tl.float32) * inv_scale, -FP8_MAX, FP8_MAX)
    return x


def check(cond: bool, msg: str) -> None:
    """Raise ValueError(msg) unless cond: the wrappers' one way to reject bad arguments."""
    if not cond:
        raise ValueError(msg)


def check_float(name: str, t: torch.Tensor) -> None:
    check(t.dtype in FLOAT_DTYPES, f"{name} must be fp16, bf16 or fp32, got {t.dtype}")


def check_int(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    check(t.dtype in dtypes, f"{name} must have dtype in {list(dtypes)}, got {t.dtype}")


def check_last_contiguous(name: str, t: torch.Tensor) -> None:
    check(t.stride(-1) == 1, f"{name} must be contiguous in its last dim, strides {t.stride()}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    check(len(set(devices.values())) == 1, f"tensors on different devices: {devices}")


def check_kv_cache(kv_cache: torch.Tensor) -> None:
    """[2, num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous."""
    check(kv_cache.dim() == 5 and kv_cache.shape[0] == 2,
          f"kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
          f"got {tuple(kv_cache.shape)}")
    check(kv_cache.dtype in KV_DTYPES,
          f"kv_cache must be fp16, bf16, fp32 or fp8 (e4m3fn, e5m2), got {kv_cache.dtype}")
    check_last_contiguous("kv_cache", kv_cache)


def check_paged(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                seq_lens: torch.Tensor) -> None:
    """Attention arguments: q [*, H, D] against kv_cache [2, N, bs, Hk, D], int32 tables."""
    check_kv_cache(kv_cache)
    hk, d = kv_cache.shape[3], kv_cache.shape[4]
    check(q.dim() == 3 and q.shape[2] == d, f"q must be [*, H, {d}], got {tuple(q.shape)}")
    check(q.shape[1] % hk == 0, f"query heads {q.shape[1]} not a multiple of KV heads {hk}")
    check(q.dtype == kv_cache.dtype or kv_cache.dtype in FP8_MAX,
          f"q dtype {q.dtype} != kv_cache dtype {kv_cache.dtype}")
    check_float("q", q)
    check(d >= 16, f"head_dim must be >= 16 (tl.dot minimum), got {d}")
    check_last_contiguous("q", q)
    num_seqs = seq_lens.shape[0]
    check(seq_lens.dim() == 1, f"seq_lens must be [B], got {tuple(seq_lens.shape)}")
    check(block_tables.dim() == 2 and block_tables.shape[0] == num_seqs,
          f"block_tables must be [B={num_seqs}, max_blocks], got {tuple(block_tables.shape)}")
    check_int("block_tables", block_tables, (torch.int32,))
    check_int("seq_lens", seq_lens, (torch.int32,))
    check_last_contiguous("block_tables", block_tables)
    check_same_device(q=q, kv_cache=kv_cache, block_tables=block_tables, seq_lens=seq_lens)


def check_out(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A caller's output buffer must match ``like`` in shape, dtype and device; None: new."""
    if out is None:
        return torch.empty_like(like)
    check(out.shape == like.shape and out.dtype == like.dtype and out.device == like.device,
          f"out must be {like.dtype} {tuple(like.shape)} on {like.device}, got {out.dtype} "
          f"{tuple(out.shape)} on {out.device}")
    check_last_contiguous("out", out)
    return out


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))

"""fp8 KV caches (``cache.kv_cache_dtype``): the Triton kernels that write, read and move KV
against their torch twins on the same fp8 bytes. The cache holds K / k_scale and V / v_scale;
the twins dequantize it, so the comparison measures the kernels, not fp8's rounding (which
``test_fp8_rounding_error_is_bounded`` bounds separately)."""

from __future__ import annotations

import pytest
import torch

from encore.kernels import reference as R
from encore.kernels.decode_attention import decode_attention
from encore.kernels.kv_write import kv_write
from encore.kernels.prefill_attention import prefill_attention
from encore.kernels.rope import rerotate_copy
from tests.kernels.conftest import DEVICE, TOL, paged_batch, rel_err

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
SCALES = (0.5, 2.0)  # k_scale, v_scale: a kernel that drops or swaps one fails
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
# Triton 3.8's interpreter rounds fp32 -> fp8 wrongly where rounding carries into the next
# exponent (7.8 -> 4.0 in e4m3; 156 of 8192 test values): kernels that write fp8 are checked
# on a GPU only. Reading fp8 (every value exact in fp32) is right there and tested on the CPU.
writes_fp8 = pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter's fp8 rounding is "
                                "wrong (see above)")


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@gpu
@writes_fp8
@pytest.mark.parametrize("fp8", FP8)
def test_kv_write_stores_scaled_saturated_values(fp8):
    t, hk, d = 7, 2, 32
    cache = torch.zeros(2, 4, 8, hk, d, device=DEVICE).to(fp8)
    ref = cache.clone().cpu()  # the reference writes this host copy
    k = torch.randn(t, hk, d, device=DEVICE) * 3
    v = torch.randn(t, hk, d, device=DEVICE)
    k[0, 0, 0] = 1e6  # beyond any fp8 range: saturates, never inf / NaN
    slots = torch.tensor([0, 3, 9, -1, 17, 30, 31], device=DEVICE)
    kv_write(cache, k, v, slots, *SCALES)
    R.kv_write(ref, k.cpu(), v.cpu(), slots.cpu(), *SCALES)
    assert torch.equal(_raw(cache).cpu(), _raw(ref))
    assert torch.isfinite(cache.float()).all()
    assert cache[0].float().max() == torch.finfo(fp8).max


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_decode_over_fp8_cache(fp8, num_splits, q_dtype):
    """A bf16 q runs the MMAs in fp16 (FP16_MMA); an fp32 q in fp32."""
    seq_lens, group, hk, d = [1, 17, 70], 4, 2, 32
    kv, tables = paged_batch(seq_lens, 16, hk, d, fp8)
    q = torch.randn(len(seq_lens), hk * group, d, device=DEVICE).to(q_dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    ref = R.decode_attention(q.float(), kv, tables, lens, d ** -0.5, *SCALES)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, kv, tables, lens, d ** -0.5, max(seq_lens), num_splits, out=out,
                     k_scale=SCALES[0], v_scale=SCALES[1])
    assert rel_err(out, ref) < TOL[q_dtype]


@pytest.mark.parametrize("fp8", FP8)
def test_prefill_over_fp8_cache_with_prefix_and_positions(fp8):
    query_lens, prefix_lens, group, hk, d = [9, 21, 1], [0, 13, 40], 3, 2, 32
    seq_lens = [p + n for p, n in zip(prefix_lens, query_lens, strict=True)]
    kv, tables = paged_batch(seq_lens, 16, hk, d, fp8)
    q = torch.randn(sum(query_lens), hk * group, d, device=DEVICE)
    qsl = torch.tensor([0, 9, 30, 31], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    ref = R.prefill_attention(q, kv, tables, qsl, lens, d ** -0.5, None, *SCALES)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, kv, tables, qsl, lens, d ** -0.5, 21, out=out, k_scale=SCALES[0],
                      v_scale=SCALES[1])
    assert rel_err(out, ref) < TOL[torch.float32]
    # blending's kept rows: scattered positions
    positions = torch.tensor([0, 2, 3, 4, 5, 6, 7, 8, 8] + list(range(13, 34)) + [40],
                             dtype=torch.int32, device=DEVICE)
    ref = R.prefill_attention(q, kv, tables, qsl, lens, d ** -0.5, positions, *SCALES)
    prefill_attention(q, kv, tables, qsl, lens, d ** -0.5, 21, out=out, q_positions=positions,
                      k_scale=SCALES[0], v_scale=SCALES[1])
    assert rel_err(out, ref) < TOL[torch.float32]


def test_scales_ignored_for_a_float_cache():
    """A checkpoint's k_scale/v_scale mean nothing to a bf16 cache: same output either way."""
    kv, tables = paged_batch([40], 16, 2, 32, torch.float32)
    q = torch.randn(1, 4, 32, device=DEVICE)
    lens = torch.tensor([40], dtype=torch.int32, device=DEVICE)
    plain = decode_attention(q, kv, tables, lens, 0.2, 40)
    scaled = decode_attention(q, kv, tables, lens, 0.2, 40, k_scale=0.5, v_scale=3.0)
    assert torch.equal(plain, scaled)


@gpu
@writes_fp8
@pytest.mark.parametrize("fp8", FP8)
def test_rerotate_copy_fp8(fp8):
    """Blending's chunk copy on an fp8 cache: the rotation acts on the stored (scaled) values."""
    caches = [torch.randn(2, 6, 8, 2, 32, device=DEVICE).to(fp8) for _ in range(2)]
    refs = [c.cpu().clone() for c in caches]
    src = torch.tensor([0, 1, 2, 9], device=DEVICE)
    dst = torch.tensor([20, 21, 22, 40], device=DEVICE)
    deltas = torch.tensor([5, 5, 5, -3], device=DEVICE)
    inv_freq = R.rope_inv_freq(32).to(DEVICE)
    rerotate_copy(caches, src, dst, deltas, inv_freq)
    R.rerotate_copy(refs, src.cpu(), dst.cpu(), deltas.cpu(), inv_freq.cpu())
    for c, r in zip(caches, refs, strict=True):
        flat, rflat = c.cpu().view(2, -1, 2, 32), r.view(2, -1, 2, 32)
        assert torch.equal(_raw(flat[1]), _raw(rflat[1]))  # V copied byte for byte
        # K: one fp8 rounding of the same fp32 rotation (ties may round apart on a GPU)
        assert rel_err(flat[0, dst.cpu()].float(), rflat[0, dst.cpu()].float()) < 0.07


@pytest.mark.parametrize("fp8,bound", [(torch.float8_e4m3fn, 0.04), (torch.float8_e5m2, 0.08)])
def test_fp8_rounding_error_is_bounded(fp8, bound):
    """What fp8 KV costs in attention output against the same KV in fp32 (relative L2)."""
    seq_lens, hk, d = [200, 64], 2, 64
    kv32, tables = paged_batch(seq_lens, 16, hk, d, torch.float32)
    kv8 = R.to_kv(kv32, fp8)
    q = torch.randn(2, hk * 4, d, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    exact = decode_attention(q, kv32, tables, lens, d ** -0.5, 200)
    approx = decode_attention(q, kv8, tables, lens, d ** -0.5, 200)
    assert rel_err(approx, exact) < bound


# ------------------------------------------------------------------ full shapes (GPU)
@gpu
@needs_cuda
@pytest.mark.parametrize("fp8", FP8)
def test_fp8_kernels_llama8b_shape(fp8):
    """llama-3-8b's attention shape (32 heads, 8 KV heads, D 128, blocks of 16), bf16 q."""
    seq_lens, hk, d = [3000, 517, 1, 4096], 8, 128
    kv, tables = paged_batch(seq_lens, 16, hk, d, fp8)
    q = torch.randn(len(seq_lens), 32, d, device=DEVICE, dtype=torch.bfloat16)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    ref = R.decode_attention(q.float(), kv, tables, lens, d ** -0.5, *SCALES)
    out = decode_attention(q, kv, tables, lens, d ** -0.5, max(seq_lens), k_scale=SCALES[0],
                           v_scale=SCALES[1])
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    qp = torch.randn(600, 32, d, device=DEVICE, dtype=torch.bfloat16)
    qsl = torch.tensor([0, 512, 599, 600, 600], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([3000, 600, 87 + 1, 4096], dtype=torch.int32, device=DEVICE)
    kv, tables = paged_batch([3000, 600, 88, 4096], 16, hk, d, fp8)
    ref = R.prefill_attention(qp.float(), kv, tables, qsl, lens, d ** -0.5, None, *SCALES)
    out = prefill_attention(qp, kv, tables, qsl, lens, d ** -0.5, 512, k_scale=SCALES[0],
                            v_scale=SCALES[1])
    assert rel_err(out, ref) < TOL[torch.bfloat16]

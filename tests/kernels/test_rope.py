"""RoPE kernels: fused q/k rotation and re-rotation of cached keys by a position delta."""

from __future__ import annotations

import pytest
import torch

from encore.kernels import reference as R
from encore.kernels.kv_write import kv_write
from encore.kernels.rope import rerotate_copy, rope_kv_write, rope_qk, rope_rerotate_blocks
from tests.kernels.conftest import DEVICE, TOL, rel_err


def _llama3_inv_freq(d: int) -> torch.Tensor:
    """A scaled inv_freq (llama3-style: low frequencies stretched by 8)."""
    inv = R.rope_inv_freq(d, 500000.0)
    return torch.where(inv < inv[len(inv) // 2], inv / 8, inv)


@pytest.mark.parametrize("h,hk,d,dtype", [(4, 4, 16, torch.float32), (6, 2, 64, torch.bfloat16),
                                          (8, 2, 128, torch.float16)])
def test_rope_qk_matches_twin_on_fused_qkv_views(h, hk, d, dtype):
    t = 7
    qkv = torch.randn(t, (h + 2 * hk) * d, device=DEVICE).to(dtype)
    q, k = qkv[:, :h * d].view(t, h, d), qkv[:, h * d:(h + hk) * d].view(t, hk, d)
    pos = torch.randint(0, 9000, (t,), device=DEVICE)
    inv = _llama3_inv_freq(d).to(DEVICE)
    q_ref, k_ref = q.cpu().clone(), k.cpu().clone()
    R.rope_qk(q_ref, k_ref, pos.cpu(), inv.cpu())
    v_before = qkv[:, (h + hk) * d:].clone()
    rope_qk(q, k, pos, inv)
    assert rel_err(q, q_ref) < TOL[dtype] and rel_err(k, k_ref) < TOL[dtype]
    assert torch.equal(qkv[:, (h + hk) * d:], v_before), "rope_qk touched V"


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32),
                                               (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float8_e4m3fn)], ids=str)
def test_rope_kv_write_equals_rope_qk_then_kv_write(dtype, cache_dtype):
    """The fused kernel: q rotated in place, rotated k and v in the cache (scaled for fp8),
    padding rows (slot -1) not written, k itself untouched; bit for bit the two kernels."""
    t, h, hk, d = 6, 6, 2, 64
    qkv = torch.randn(t, (h + 2 * hk) * d, device=DEVICE).to(dtype)
    q = qkv[:, :h * d].view(t, h, d)
    k = qkv[:, h * d:(h + hk) * d].view(t, hk, d)
    v = qkv[:, (h + hk) * d:].view(t, hk, d)
    pos = torch.randint(0, 9000, (t,), device=DEVICE)
    slots = torch.tensor([5, 17, -1, 40, 2, -1], device=DEVICE)
    inv = _llama3_inv_freq(d).to(DEVICE)
    cache = torch.randn(2, 4, 16, hk, d, device=DEVICE).to(cache_dtype)
    ref_qkv, ref_cache = qkv.clone(), cache.clone()
    rq, rk = ref_qkv[:, :h * d].view(t, h, d), ref_qkv[:, h * d:(h + hk) * d].view(t, hk, d)
    rope_qk(rq, rk, pos, inv)
    kv_write(ref_cache, rk, ref_qkv[:, (h + hk) * d:].view(t, hk, d), slots, 0.5, 2.0)
    k_before = k.clone()
    rope_kv_write(q, k, v, pos, inv, cache, slots, 0.5, 2.0)
    assert torch.equal(q, rq)
    assert torch.equal(k, k_before), "k must be left as projected"
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))


def test_rope_kv_write_rejects_mismatched_shapes():
    q, k = torch.zeros(3, 4, 32, device=DEVICE), torch.zeros(3, 2, 32, device=DEVICE)
    cache = torch.zeros(2, 4, 16, 2, 32, device=DEVICE)
    inv = R.rope_inv_freq(32).to(DEVICE)
    pos = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="disagree"):
        rope_kv_write(q, k, k, pos, inv, cache, torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="do not match"):
        rope_kv_write(q, q, k, pos, inv, cache, pos)


@pytest.mark.parametrize("bs,hk,d", [(16, 2, 32), (32, 3, 64)])
def test_rerotate_equals_rope_at_new_position(bs, hk, d):
    """Keys roped at p, cached, moved by delta == keys roped at p + delta (fp32)."""
    inv = R.rope_inv_freq(d).to(DEVICE)
    blocks, n = torch.tensor([4, 1, 6]), 8
    deltas = torch.tensor([37, -5, 1000])
    raw = torch.randn(n, bs, hk, d)
    kv = torch.randn(2, n, bs, hk, d, device=DEVICE)
    v_before = kv[1].clone()
    expect = kv[0].clone().cpu()
    for j, (blk, delta) in enumerate(zip(blocks.tolist(), deltas.tolist(), strict=True)):
        p = torch.arange(bs) + 100 * j  # the chunk's original positions
        k_at = lambda pos, x=raw[blk]: R._rotate(x, pos, inv.cpu())  # noqa: E731
        kv[0, blk] = k_at(p).to(DEVICE)
        expect[blk] = k_at(p + delta)
    rope_rerotate_blocks(kv, blocks.to(DEVICE), deltas.to(DEVICE), inv)
    assert rel_err(kv[0], expect) < 1e-5
    assert torch.equal(kv[1], v_before)


def test_rerotate_matches_twin_bf16_and_int_delta():
    inv = _llama3_inv_freq(64).to(DEVICE)
    kv = torch.randn(2, 5, 16, 2, 64, device=DEVICE).bfloat16()
    ref = kv.clone().cpu()
    blocks = torch.tensor([0, 3], device=DEVICE)
    R.rope_rerotate_blocks(ref, blocks.cpu(), torch.tensor([-300, -300]), inv.cpu())
    rope_rerotate_blocks(kv, blocks, -300, inv)
    assert rel_err(kv, ref) < TOL[torch.bfloat16]
    with pytest.raises(ValueError, match="inv_freq"):
        rope_rerotate_blocks(kv, blocks, 1, inv[:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rerotate_copy_moves_tokens_to_new_positions(dtype):
    """A chunk's keys roped at 0..n-1, copied token by token to other slots and moved by their
    delta, equal keys roped at the new positions; V is copied as is; sources untouched."""
    hk, d, bs = 3, 32, 8
    inv = _llama3_inv_freq(d).to(DEVICE)
    raw = torch.randn(11, hk, d)
    kv = torch.zeros(2, 6, bs, hk, d, device=DEVICE, dtype=dtype)
    flat = kv.view(2, -1, hk, d)
    src = torch.arange(3, 14)  # the stored chunk: positions 0..10 at slots 3..13
    flat[0, src] = R._rotate(raw, torch.arange(11), inv.cpu()).to(DEVICE, dtype)
    flat[1, src] = torch.randn(11, hk, d).to(DEVICE, dtype)
    before = kv.clone()
    dst = torch.tensor([20, 21, 22, 23, 30, 31, 32, 40, 41, 42, 47])  # any layout
    deltas = torch.full((11,), 29)
    other = torch.randn_like(kv)  # a second layer, moved in the same launch
    other_before = other.clone()
    rerotate_copy([kv, other], src.to(DEVICE), dst.to(DEVICE), deltas.to(DEVICE), inv)
    expect_k = R._rotate(raw, torch.arange(11) + 29, inv.cpu())
    assert rel_err(flat[0, dst.to(DEVICE)].float(), expect_k) < TOL[dtype]
    assert torch.equal(flat[1, dst.to(DEVICE)], before.view(2, -1, hk, d)[1, src.to(DEVICE)])
    assert torch.equal(flat[:, src.to(DEVICE)], before.view(2, -1, hk, d)[:, src.to(DEVICE)])
    twins = [before.clone().cpu(), other_before.cpu()]
    R.rerotate_copy(twins, src, dst, deltas, inv.cpu())
    assert rel_err(kv, twins[0]) < TOL[dtype]
    assert rel_err(other, twins[1]) < TOL[dtype]

"""The fused tier codec kernels (``kernels/kv_codec.py``) against the torch codec they twin
(``worker/tiers/codec.py``): the same payload bytes from gather_encode (but the odd code a
rounding tie away), the same values from decode_scatter, written only into the named blocks."""

from __future__ import annotations

import pytest
import torch

from encore.kernels.kv_codec import decode_scatter, gather_encode
from encore.kernels.rope import layer_pointers
from encore.worker.tiers.codec import KVCodec
from tests.helpers.tier_codec import error_ratio, kv_like
from tests.kernels.conftest import DEVICE

BITS = {"int8": 8, "int4": 4}


def _caches(layers: int, blocks: int, shape: tuple[int, ...], dtype: torch.dtype
            ) -> list[torch.Tensor]:
    """Layer caches [2, blocks, bs, heads, dim] of random KV (keys with outlier channels)."""
    return [kv_like((blocks, *shape), dtype, seed=layer).transpose(0, 1).contiguous()
            .to(DEVICE) for layer in range(layers)]


def _blocks(caches: list[torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Blocks ``ids`` as the torch codec takes them: [n, layers, 2, bs, heads, dim]."""
    return torch.stack([torch.stack([c[:, i].cpu() for c in caches]) for i in ids])


def _check_codec(codec: str, dtype: torch.dtype, shape: tuple[int, ...], layers: int) -> None:
    caches = _caches(layers, 9, shape, dtype)
    ids = [7, 0, 3, 8]
    id_t = torch.tensor(ids, device=DEVICE)
    twin = KVCodec(codec, shape, dtype)
    before = _blocks(caches, ids)
    ref = twin.encode(before)
    got = gather_encode(caches, layer_pointers(caches), id_t, BITS[codec]).cpu()
    params = slice(twin.sizes[0] + twin.sizes[1], None)
    assert torch.equal(got[..., params], ref[..., params]), "fp16 zero/scale differ"
    codes_same = (got == ref).float().mean().item()
    assert codes_same >= 0.998, f"only {codes_same:.5f} of the codes agree (ties only)"
    assert max(error_ratio(before, twin.decode(got), codec)) <= 1.0

    out = [torch.full_like(c, float("nan")) for c in caches]
    decode_scatter(got.to(DEVICE), out, layer_pointers(out), id_t, BITS[codec])
    after = _blocks(out, ids)
    expected = twin.decode(got)
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        # the interpreter rounds fp32 -> bf16 toward zero, CUDA (and torch) to nearest
        torch.testing.assert_close(after, expected, rtol=2**-7, atol=0)
    else:
        assert torch.equal(after, expected)
    untouched = [i for i in range(9) if i not in ids]
    assert all(torch.isnan(c[:, untouched]).all() for c in out), "wrote outside the blocks"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_fused_codec_matches_the_torch_codec(codec, dtype):
    _check_codec(codec, dtype, (2, 16, 2, 32), layers=3)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="llama-3-8b block shapes: too slow interpreted")
@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_fused_codec_matches_on_llama_3_8b_blocks(codec):
    _check_codec(codec, torch.bfloat16, (2, 16, 8, 128), layers=4)


def test_bad_arguments_are_rejected():
    caches = _caches(2, 4, (2, 16, 2, 32), torch.float32)
    ptrs, ids = layer_pointers(caches), torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="bits"):
        gather_encode(caches, ptrs, ids, 3)
    with pytest.raises(ValueError, match="ids"):
        gather_encode(caches, ptrs, ids.int(), 8)
    with pytest.raises(ValueError, match="ptrs"):
        gather_encode(caches, ptrs[:1], ids, 8)
    payload = gather_encode(caches, ptrs, ids, 8)
    with pytest.raises(ValueError, match="payload"):
        decode_scatter(payload[:1], caches, ptrs, ids, 8)
    with pytest.raises(ValueError, match="power of two"):
        odd = [torch.zeros(2, 4, 12, 2, 32, device=DEVICE) for _ in range(2)]
        gather_encode(odd, layer_pointers(odd), ids, 8)

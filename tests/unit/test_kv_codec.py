"""The lower tiers' KV codec (``worker/tiers/codec.py``): error bounds, payload sizes, int4
packing, and what it changes around it (capacities, prices, fingerprints, the disk scan)."""

from __future__ import annotations

import pytest
import torch

from encore.configs.fields import ConfigError
from encore.configs.loading import build_config
from encore.kvmanager.tiered import TieredCache, TierSetup
from encore.worker.models.presets import preset
from encore.worker.tiers.codec import KVCodec
from encore.worker.tiers.data_plane import kv_fingerprint, layout_fingerprints
from encore.worker.tiers.disk_files import DiskStore
from encore.worker.tiers.frames import HEADER
from tests.helpers.tier_codec import data_plane, error_ratio, kv_like, round_trip

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPE = (2, 16, 4, 32)  # one layer of a block: K/V, tokens, heads, dim


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_round_trip_error_is_within_half_a_step_of_each_range(codec, dtype):
    """Keys: per (layer, head, dim) over the tokens; values: per (layer, token, head) over
    head_dim. Errors reach the bound (half a step) but never pass it."""
    x = kv_like((3, 4, *SHAPE), dtype)
    c = KVCodec(codec, SHAPE, dtype)
    y = c.decode(c.encode(x))
    assert y.dtype == dtype and y.shape == x.shape
    k_ratio, v_ratio = error_ratio(x, y, codec)
    print(f"{codec} {dtype}: worst error / bound: keys {k_ratio:.3f}, values {v_ratio:.3f}")
    assert k_ratio <= 1.0 and v_ratio <= 1.0
    assert k_ratio > 0.5 and v_ratio > 0.5  # the bound is tight, not vacuous


def test_per_channel_keys_keep_outlier_channels_from_hurting_the_rest():
    """One key channel 1000x larger costs the other channels nothing (per-channel scales);
    one value token 1000x larger costs the other tokens nothing (per-token scales)."""
    x = kv_like((1, 1, *SHAPE), torch.float32)
    big = x.clone()
    big[..., 0, :, :, 3] *= 1000  # a key channel
    big[..., 1, 5, :, :] *= 1000  # a value token
    c = KVCodec("int8", SHAPE, torch.float32)
    err = (c.decode(c.encode(big)) - big).abs()
    ref = (c.decode(c.encode(x)) - x).abs()
    assert torch.equal(err[..., 0, :, :, :3], ref[..., 0, :, :, :3])
    assert torch.equal(err[..., 1, :5, :, :], ref[..., 1, :5, :, :])


def test_constant_and_far_from_zero_ranges_still_meet_the_bound():
    """A constant channel (zero range) and a narrow range far from zero: the fp16 zero and
    scale are rounded outward, so the grid still covers the range."""
    x = torch.full((1, 1, *SHAPE), 3.3)
    x[..., 0, :, 0, :] = 1000.0 + torch.linspace(0, 0.5, 16)[:, None]
    x[..., 1, :, 1, :] = -777.7 + torch.linspace(0, 0.25, 32)
    for codec in ("int8", "int4"):
        c = KVCodec(codec, SHAPE, torch.float32)
        k_ratio, v_ratio = error_ratio(x, c.decode(c.encode(x)), codec)
        assert k_ratio <= 1.0 and v_ratio <= 1.0


@pytest.mark.parametrize("codec,ratio", [("none", 1.0), ("int8", 1.75), ("int4", 3.12)])
def test_payload_size_and_a_gib_holds_that_many_more_blocks(codec, ratio):
    """llama-3-8b's block (32 layers, 8 KV heads, dim 128, 16 tokens, bf16: 2 MiB)."""
    shape = (2, 16, 8, 128)
    c = KVCodec(codec, shape, torch.bfloat16)
    bits = c.bits or 16
    codes = 2 * 16 * 8 * 128 * bits // 8
    params = (2 * 8 * 128 + 2 * 16 * 8) * 2 if c.bits else 0  # fp16 (zero, scale) pairs
    assert c.layer_bytes == codes + params
    assert 32 * 2 * 16 * 8 * 128 * 2 / (32 * c.layer_bytes) == pytest.approx(ratio, abs=0.01)
    x = kv_like((2, 3, *shape), torch.bfloat16)
    payload = c.encode(x)
    assert payload.dtype == torch.uint8 and payload.shape == (2, 3, c.layer_bytes)


def test_int4_packs_two_codes_a_byte_even_element_low():
    """Values of one token rise 0..15 steps along head_dim: codes 0, 1, 2, ... in order."""
    shape = (2, 1, 1, 32)
    x = torch.zeros((1, 1, *shape))
    x[..., 1, 0, 0, :] = torch.arange(32) % 16  # values: codes = the values themselves
    c = KVCodec("int4", shape, torch.float32)
    payload = c.encode(x)[0, 0]
    codes_v = payload[c.sizes[0]: c.sizes[0] + c.sizes[1]]
    assert codes_v.tolist() == [(2 * i % 16) | ((2 * i + 1) % 16) << 4 for i in range(16)]
    assert torch.equal(c.decode(c.encode(x)), x)


def test_layers_encode_alone_so_host_groups_concatenate_to_a_file():
    """The payload is layer-major: layers encoded in groups equal the whole block's bytes
    (a host slot's groups are the disk file's payload)."""
    x = kv_like((2, 6, *SHAPE), torch.bfloat16)
    for codec in ("none", "int8", "int4"):
        c = KVCodec(codec, SHAPE, torch.bfloat16)
        whole = c.encode(x)
        parts = torch.cat([c.encode(x[:, :1]), c.encode(x[:, 1:4]), c.encode(x[:, 4:])], 1)
        assert torch.equal(whole, parts)


def test_none_is_the_blocks_own_bytes():
    x = kv_like((2, 3, *SHAPE), torch.bfloat16)
    c = KVCodec("none", SHAPE, torch.bfloat16)
    payload = c.encode(x)
    assert payload.data_ptr() == x.data_ptr()
    assert torch.equal(c.decode(payload), x)


def test_unknown_codec_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match=r"tier_kv_codec='int3'.*\['none', 'int8', 'int4'\]"):
        build_config(overrides={"tier_kv_codec": "int3"})
    assert build_config().cache.tier_kv_codec == "none"


def test_fp8_device_kv_takes_no_tier_codec():
    with pytest.raises(ConfigError, match="not supported"):
        build_config(overrides={"kv_cache_dtype": "fp8_e4m3", "tier_kv_codec": "int8"})
    build_config(overrides={"kv_cache_dtype": "fp8_e4m3", "tier_kv_codec": "none"})


def test_codec_none_carries_fp8_blocks_as_they_are():
    x = kv_like((2, 3, *SHAPE), torch.float32).clamp(-400, 400).to(torch.float8_e4m3fn)
    c = KVCodec("none", SHAPE, torch.float8_e4m3fn)
    assert c.layer_bytes == 2 * 16 * 4 * 32
    assert torch.equal(c.decode(c.encode(x)).view(torch.uint8), x.view(torch.uint8))


@pytest.mark.parametrize("via", ["host", "disk"])
@pytest.mark.parametrize("codec", ["none", "int8", "int4"])
def test_blocks_cross_the_data_plane_within_the_bound(tmp_path, codec, via):
    """Device -> host (encoded in the step) or disk (encoded by the I/O thread) -> device,
    on the CPU."""
    plane = data_plane(tmp_path, codec, torch.bfloat16, "cpu")
    try:
        before, after = round_trip(plane, via)
        assert plane.blocks.tier_block_bytes == plane.blocks.codec.layer_bytes * 5
        if codec == "none":
            assert torch.equal(before, after)
        else:
            assert max(error_ratio(before, after, codec)) <= 1.0
            assert plane.disk.store is not None
            assert plane.disk.store.file_bytes - HEADER.size == plane.blocks.tier_block_bytes
    finally:
        plane.close()


def test_a_gib_of_host_holds_more_encoded_blocks(tmp_path):
    """Host and disk capacities are budgets over the encoded block: this test's small blocks
    (heads 2, dim 16: 10 KiB in bf16) hold 1.6x as many at int8 and 2.67x at int4 (llama-3-8b's
    blocks 1.75x and 3.1x, ``test_payload_size...``)."""
    sizes = {}
    for codec in ("none", "int8", "int4"):
        plane = data_plane(tmp_path / codec, codec, torch.bfloat16, "cpu")
        per_block = plane.blocks.tier_block_bytes
        assert plane.num_host_blocks == int(0.01 * 2**30 // per_block)
        assert plane.disk.num_blocks == int(10 * 2**30 // per_block)
        sizes[codec] = plane.num_host_blocks
        plane.close()
    assert sizes["int8"] / sizes["none"] == pytest.approx(1.6, abs=0.01)
    assert sizes["int4"] / sizes["none"] == pytest.approx(2.67, abs=0.01)


def test_load_or_recompute_and_pins_price_the_encoded_bytes():
    """The cost model and the TTL pins' miss price use the tier's (encoded) block size;
    device usage stays in device bytes."""
    plain = TieredCache(TierSetup(block_bytes=4096, num_host_blocks=8), 16)
    small = TieredCache(TierSetup(block_bytes=4096, tier_block_bytes=1024, num_host_blocks=8),
                        16)
    assert small.policy.block_bytes == 1024 and plain.policy.block_bytes == 4096
    for t in (plain, small):
        t.policy.numbers.bandwidth["host"] = 1e6  # slow enough that bytes dominate
    assert small.miss_cost(10) < plain.miss_cost(10)
    assert small.block_bytes == 4096


def test_the_codec_enters_the_fingerprint():
    config = build_config(overrides={"model": "tiny", "load_format": "dummy"})
    arch, shape = preset("tiny"), (2, 2, 16, 2, 16)
    prints = {c: kv_fingerprint(config, arch, torch.bfloat16, shape, codec=c)
              for c in ("none", "int8", "int4")}
    assert len(set(prints.values())) == 3
    assert kv_fingerprint(config, arch, torch.bfloat16, shape) == prints["none"]
    layouts = layout_fingerprints(config, arch, [torch.bfloat16, torch.float8_e4m3fn], shape)
    assert len(layouts) == 6 and set(prints.values()) <= layouts
    tp = kv_fingerprint(config, arch, torch.bfloat16, shape, 1, 2, codec="int8")
    assert tp != prints["int8"]


def test_the_scan_drops_another_codecs_files_without_counting_them_bad(tmp_path):
    key = b"k" * 32
    mac = b"m" * 32
    DiskStore(tmp_path, b"A" * 32, 100, mac).write(key, b"x" * 100)
    DiskStore(tmp_path, b"C" * 32, 100, mac).write(b"j" * 32, b"x" * 100)
    store = DiskStore(tmp_path, b"B" * 32, 60, mac, retired=frozenset({b"A" * 32}))
    keys, bad = store.scan(10)
    assert keys == [] and bad == 1  # A's file: retired, not bad; C's: another model, bad
    assert not store.path(key).exists() and not store.path(b"j" * 32).exists()

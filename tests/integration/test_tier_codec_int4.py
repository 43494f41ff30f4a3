"""The int4 tier codec on the embedded model (SmolLM2, fp32, CPU): prompts pushed out of a
small device pool into the host tier and loaded back agree with their cold (uncompressed)
runs within looser bounds than int8's (``test_tier_codec.py``; a file of its own to keep each
file's engine starts few)."""

from __future__ import annotations

import pytest

from tests.helpers.tier_codec import HOST_GIB, cold_then_warm, compare, start, story_prompts

pytestmark = pytest.mark.slow


def test_int4_from_host_matches_the_uncompressed_run_loosely():
    core = start(tier_kv_codec="int4", host_cache_gib=HOST_GIB)
    cold, warm = cold_then_warm(core, story_prompts())
    stats = core.scheduler.stats()
    core.shutdown()
    assert stats["kv_tier_hit_tokens"]["host"] >= 8 * 64
    # usage is counted in encoded blocks: 30 layers x 4032 B (fp32 on the device: 737,280 B)
    usage = stats["kv_tier_usage_bytes"]["host"]
    assert usage > 0 and usage % (30 * 4032) == 0
    compare(cold, warm, "int4", "host")

"""The int8 tier codec with a real engine: quality on the embedded model, and misses across
codecs on a tiny dummy model (int4's quality: ``test_tier_codec_int4.py``).

Quality (SmolLM2, fp32, CPU): each prompt runs cold, is pushed out of a small device pool into
the host tier by the others, and runs again with its prefix loaded from host (int8); then,
after a restart, all of them at once from the disk tier that the first life left behind (the
default write policy and the shutdown flush). The cold run is the uncompressed reference:
with ``tier_kv_codec: none`` a tier hit reproduces it exactly (``test_kv_tiers_engine.py``).

Misses: a disk file or a remote value written under one codec is, for a server restarted
under another, a plain miss: recomputed, not counted as a bad file or a remote error.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from encore.scheduler.engine import EngineCore
from tests.e2e.redis_server import start_store, stop_store
from tests.helpers.tier_codec import (
    HOST_GIB,
    cold_then_warm,
    compare,
    run,
    run_all,
    start,
    story_prompts,
)

pytestmark = pytest.mark.slow


def test_int8_from_host_then_from_disk_after_a_restart_matches_the_uncompressed_run(tmp_path):
    ps = story_prompts()
    tiers = {"tier_kv_codec": "int8", "host_cache_gib": HOST_GIB,
             "disk_cache_dir": str(tmp_path)}
    core = start(**tiers)
    cold, warm = cold_then_warm(core, ps)
    stats = core.scheduler.stats()
    core.shutdown()
    assert stats["kv_tier_hit_tokens"]["host"] >= 8 * 64
    compare(cold, warm, "int8", "host")
    core = start(**tiers, num_device_blocks=64)  # room for every prompt at once
    again = run_all(core, ps, "again")
    stats = core.scheduler.stats()
    core.shutdown()
    assert stats["kv_tier_hit_tokens"]["disk"] >= 8 * 64 and stats["kv_disk_corrupt_files"] == 0
    compare(cold, again, "int8", "disk, after a restart")


def tiny(tmp: Path, codec: str, **overrides) -> EngineCore:
    return start(**{"model": "tiny", "load_format": "dummy", "tier_kv_codec": codec,
                    "disk_cache_dir": str(tmp), **overrides})


def life(tmp: Path, codec: str, ps: list[list[int]], **overrides) -> tuple[list, dict]:
    """One server life: every prompt once, then a graceful shutdown (which writes the cached
    blocks to disk and remote)."""
    core = tiny(tmp, codec, **overrides)
    results = [run(core, p, f"{codec}{i}") for i, p in enumerate(ps)]
    stats = core.scheduler.stats()
    core.shutdown()
    return results, stats


def test_disk_files_of_another_codec_are_misses_not_errors(tmp_path):
    ps = [[3 + (i * 7 + j * 13) % 500 for j in range(70)] for i in range(3)]
    first, _ = life(tmp_path, "int8", ps)
    assert len(list((tmp_path / "kv").glob("*/*.kv"))) >= 3 * 4
    for codec, before in (("none", "int8"), ("int8", "none")):
        results, stats = life(tmp_path, codec, ps)
        assert stats["kv_tier_hit_tokens"]["disk"] == 0, f"{before} files served to {codec}"
        assert stats["kv_disk_corrupt_files"] == 0
        assert all(r[1] == 0 for r in results)
        assert [r[0] for r in results] == [r[0] for r in first]
    results, stats = life(tmp_path, "int8", ps)  # the files of the last life do load
    assert stats["kv_tier_hit_tokens"]["disk"] >= 3 * 64


def test_remote_values_of_another_codec_are_misses_not_errors(tmp_path):
    store = start_store(tmp_path / "store")
    ps = [[3 + (i * 11 + j * 17) % 500 for j in range(70)] for i in range(3)]
    (tmp_path / "secret").write_text("one secret for every life\n")
    remote = {"remote_cache_url": store.url, "disk_cache_dir": None,
              "deployment_secret_file": str(tmp_path / "secret")}
    try:
        life(tmp_path, "int8", ps, **remote)
        assert len(store.client().keys("encore:kv:*")) >= 3 * 4
        results, stats = life(tmp_path, "none", ps, **remote)
        assert stats["kv_tier_hit_tokens"]["remote"] == 0 and not stats["kv_remote_errors"]
        assert all(r[1] == 0 for r in results)
        results, stats = life(tmp_path, "int8", ps, **remote)  # the int8 values do load
        assert stats["kv_tier_hit_tokens"]["remote"] >= 3 * 64
        assert not stats["kv_remote_errors"]
    finally:
        stop_store(store)

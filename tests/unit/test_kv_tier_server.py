"""Tenants from API keys (salts), the keys file, and the tier metrics (fake engine)."""

from __future__ import annotations

from pathlib import Path

from encore.protocol.client import _Router
from encore.protocol.messages import EngineOutputs, EngineStats
from encore.server.metrics import ServerMetrics
from tests.unit.server_helpers import chat_body, serve


def _salt(client, engine, key: str, **body) -> str | None:
    r = client.post("/v1/chat/completions", json=chat_body(**body),
                    headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return engine.requests[-1].cache_salt


def test_each_api_key_is_a_tenant_with_its_own_salt(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# tenants\nk-file\n\n")
    disk = str(tmp_path / "kv")
    with serve(api_keys=["k1", "k2"], api_keys_file=str(keys), disk_cache_dir=disk,
               allow_client_cache_salt=True) as (client, engine, _):
        a, b, c = (_salt(client, engine, k) for k in ("k1", "k2", "k-file"))
        assert len({a, b, c}) == 3 and all(s and s.startswith("t:") for s in (a, b, c))
        assert "k1" not in a
        assert _salt(client, engine, "k1") == a, "stable per key"
        mine = _salt(client, engine, "k1", cache_salt="x")
        assert mine.startswith(a + "|") and mine != _salt(client, engine, "k2", cache_salt="x")
    with serve(api_keys=["k1"], disk_cache_dir=disk) as (client, engine, _):
        assert _salt(client, engine, "k1") == a, "the salt survives a restart (disk secret)"


def test_unreadable_keys_file_names_the_file(tmp_path: Path) -> None:
    import pytest

    from encore.configs.loading import build_config
    from encore.server.serving import api_keys

    cfg = build_config(overrides={"api_keys_file": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="api_keys_file"):
        api_keys(cfg.server)


def test_tier_metrics_are_exported() -> None:
    router = _Router()
    for _ in range(2):
        router.dispatch(EngineOutputs(stats=EngineStats(
            values={"kv_disk_corrupt_files": 1},
            labeled={"kv_tier_usage_bytes": {"device": 10, "host": 20, "disk": 30},
                     "kv_tier_hit_tokens": {"device": 16, "host": 32},
                     "kv_tier_transfer_bytes": {"device>host": 100, "host>disk": 50}},
            observed={"kv_tier_load_seconds": [0.003, 0.2]})))
    metrics = ServerMetrics(lambda: router.totals)
    text = metrics.exposition().decode()
    assert 'encore:kv_tier_usage_bytes{tier="disk"} 30.0' in text
    assert 'encore:kv_tier_hit_tokens_total{tier="host"} 64.0' in text
    assert 'encore:kv_tier_transfer_bytes_total{dst="host",src="device"} 200.0' in text
    assert "encore:kv_disk_corrupt_files_total 2.0" in text
    assert 'encore:kv_tier_load_seconds_bucket{le="0.005"} 2.0' in text
    assert 'encore:kv_tier_load_seconds_bucket{le="+Inf"} 4.0' in text
    assert "encore:kv_tier_load_seconds_count 4.0" in text

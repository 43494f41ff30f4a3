"""The deployment files: every Grafana panel's query names a metric that /metrics exports,
and the compose file (fleet profile included) validates."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from encore.protocol.metrics import EngineTotals
from encore.server.metrics import ServerMetrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "encore.json"


def exported_series() -> set[str]:
    """Every series name /metrics declares (a histogram's _bucket, _sum and _count; a
    labelled family has no sample until something is counted, but its TYPE line is there)."""
    text = ServerMetrics(lambda: EngineTotals()).exposition().decode()
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\w+)$", text, re.M):
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        names.update(name + suffix for suffix in suffixes)
    return names


def test_every_dashboard_query_names_an_exported_metric() -> None:
    exported = exported_series()
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len(panels) >= 10
    for panel in panels:
        for target in panel["targets"]:
            names = re.findall(r"encore:[a-z_:]+", target["expr"])
            assert names, (panel["title"], target["expr"])
            missing = [n for n in names if n not in exported]
            assert not missing, f"{panel['title']}: {missing} not on /metrics"


def test_the_dashboard_covers_what_operators_ask_for() -> None:
    exprs = " ".join(t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"]
                     for t in p["targets"])
    for needed in ("time_to_first_token", "inter_token_latency", "generation_tokens",
                   "num_requests_waiting", "kv_cache_usage", "kv_tier_hit_tokens",
                   "chunk_hit_tokens", "pinned_blocks", "kv_remote_up"):
        assert f"encore:{needed}" in exprs, needed


@pytest.mark.parametrize("profile", [None, "fleet"])
def test_the_compose_file_validates(profile: str | None) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed (apt-get install docker-compose; "
                    ".ci/run installs it)")
    cmd = [binary, *(["--profile", profile] if profile else []), "config", "--services"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    services = set(out.split())
    assert {"encore", "prometheus"} <= services
    if profile == "fleet":
        assert {"router", "encore-a", "encore-b", "valkey", "grafana"} <= services

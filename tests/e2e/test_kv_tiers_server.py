"""Tiered KV cache through the real server: tenant isolation by API key, and a disk tier
that survives a restart (its own servers, on a shared disk directory)."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.e2e.e2e_server import API_KEY, start_server, stop_server

pytestmark = pytest.mark.slow

OTHER_KEY = "e2e-other-tenant"
THIRD_KEY = "e2e-third-tenant"
BLOCK_GIB = 737_280 / 1024**3
WORDS = [
    "amber", "falcon", "granite", "meadow", "saffron", "tundra", "willow", "cobalt", "harbor",
    "lyric", "nectar",
]


def story(i: int, words: int = 160) -> str:
    return f"Report {i}: " + " ".join(WORDS[(i * 5 + j * (i + 2)) % len(WORDS)]
                                      for j in range(words))


def tier_args(disk_dir) -> list[str]:
    return ["--num-device-blocks", "40", "--host-cache-gib", f"{4 * BLOCK_GIB:.8f}",
            "--disk-cache-dir", str(disk_dir), "--kv-load-policy", "always",
            "--api-key", OTHER_KEY, "--api-key", THIRD_KEY]


def complete(base: str, key: str, prompt: str) -> tuple[str, int]:
    c = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)
    r = c.completions.create(model=c.models.list().data[0].id, prompt=prompt, max_tokens=6,
                             temperature=0)
    details = r.usage.prompt_tokens_details
    return r.choices[0].text, (details.cached_tokens if details else 0) or 0


def metric(base: str, name: str, labels: str) -> float:
    text = httpx.get(base + "/metrics").text
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_tenants_are_isolated_and_the_disk_tier_survives_a_restart(tmp_path) -> None:
    disk = tmp_path / "kv"
    srv = start_server(tmp_path, *tier_args(disk))
    try:
        cold, cached = complete(srv.v1, API_KEY, story(0))
        assert cached == 0
        text, cached = complete(srv.v1, API_KEY, story(0))
        assert text == cold and cached > 0
        text, cached = complete(srv.v1, OTHER_KEY, story(0))
        assert cached == 0, "another tenant never reuses this tenant's cached tokens"
        assert text == cold
        for i in range(1, 6):  # push story 0 out of the device and host tiers to disk
            complete(srv.v1, API_KEY, story(i))
        assert metric(srv.base_url, "encore:kv_tier_usage_bytes", 'tier="disk"') > 0
    finally:
        assert stop_server(srv) == 0
    srv = start_server(tmp_path, *tier_args(disk))
    try:
        text, cached = complete(srv.v1, API_KEY, story(0))
        assert text == cold and cached >= 160
        assert metric(srv.base_url, "encore:kv_tier_hit_tokens_total", 'tier="disk"') >= cached
        _, cached = complete(srv.v1, THIRD_KEY, story(0))
        assert cached == 0, "a tenant that never sent it reuses nothing, after a restart too"
    finally:
        stop_server(srv)

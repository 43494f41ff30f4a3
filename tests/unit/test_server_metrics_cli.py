"""/metrics exposition, and the ``encore`` CLI's config resolution."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from encore.server.cli import build_parser, resolve_config
from tests.unit.server_helpers import chat_body, serve

REPO = Path(__file__).resolve().parents[2]


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exposed")


def test_metrics_exposed_and_counted() -> None:
    with serve() as (client, _, _):
        client.post("/v1/chat/completions", json=chat_body(max_tokens=4))
        client.post("/v1/chat/completions", json=chat_body(temperature=9))
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ["encore:num_requests_running", "encore:num_requests_waiting",
                 "encore:kv_cache_usage_perc", "encore:prefix_cache_queries_total",
                 "encore:prefix_cache_hits_total", "encore:num_preemptions_total"]:
        _value(text, name)
    assert _value(text, "encore:generation_tokens_total") == 4
    assert _value(text, "encore:prompt_tokens_total") == len("<user>hi\n<assistant>")
    assert 'encore:request_success_total{finished_reason="length"} 1.0' in text
    assert 'encore:request_errors_total{status="400"} 1.0' in text
    for hist in ["time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds"]:
        assert f"encore:{hist}_count" in text
    assert _value(text, "encore:time_to_first_token_seconds_count") == 1
    assert _value(text, "encore:inter_token_latency_seconds_count") == 3


def test_each_app_has_its_own_registry() -> None:
    with serve() as (a, _, _), serve() as (b, _, _):
        a.post("/v1/chat/completions", json=chat_body(max_tokens=2))
        assert _value(b.get("/metrics").text, "encore:generation_tokens_total") == 0


def _config(argv: list[str], env: dict[str, str] | None = None):
    return resolve_config(build_parser().parse_args(["serve", *argv]), env or {})


def test_precedence_defaults_preset_env_flags(tmp_path: Path) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("scheduler:\n  max_num_seqs: 3\nport: 7000\nblock_size: 32\n")
    c = _config(["--config", str(preset)])
    assert (c.scheduler.max_num_seqs, c.server.port, c.cache.block_size) == (3, 7000, 32)
    c = _config(["--config", str(preset)], {"ENCORE_PORT": "7001", "ENCORE_MAX_NUM_SEQS": "4"})
    assert (c.scheduler.max_num_seqs, c.server.port) == (4, 7001)
    c = _config(["--config", str(preset), "--port", "7002", "--no-enable-prefix-caching",
                 "--api-key", "a", "--api-keys", "b"], {"ENCORE_PORT": "7001"})
    assert (c.server.port, c.cache.enable_prefix_caching, c.server.api_keys) == \
        (7002, False, ["a", "b"])


def test_named_presets_load() -> None:
    for name in ["cpu-small", "gpu", "test"]:
        _config(["--config", name])


@pytest.mark.parametrize("argv,env,needle", [
    (["--block-size", "7"], {}, "cache.block_size"),
    (["--dtype", "fp8"], {}, "model.dtype"),
    ([], {"ENCORE_MAX_NUM_SEQS": "many"}, "scheduler.max_num_seqs"),
    (["--config", "no-such-preset"], {}, "no-such-preset"),
])
def test_bad_values_exit_2_with_one_line(argv, env, needle) -> None:
    import os

    proc = subprocess.run([sys.executable, "-m", "encore.server.cli", "serve", *argv], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr


def test_every_config_field_is_a_flag() -> None:
    from encore.configs.loading import field_registry

    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for name in field_registry():
        assert "--" + name.replace("_", "-") in help_text

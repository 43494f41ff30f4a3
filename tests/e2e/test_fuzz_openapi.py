"""Fuzz a real server from its own /openapi.json with schemathesis (issue 15).

Every generated request, valid or not, must get a documented answer: no status >= 500, no
NaN or Infinity in any body (tests/e2e/fuzz_hooks.py), every JSON body and stream event
conforming to the response schemas, 405 with ``Allow`` for other methods. Afterwards the
server is healthy, idle, and holds no KV blocks beyond TTL pins.

The seed is fixed, so a run is reproducible. ``make test`` runs a bounded number of cases
(about 1,000: schemathesis' deterministic coverage phase plus ENCORE_FUZZ_EXAMPLES random
cases per operation); ``make fuzz`` runs more (see docs/operations.md, "Fuzzing").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.e2e_server import API_KEY, REPO, Server, metric, start_server, stop_server

pytestmark = pytest.mark.slow

SEED = 15  # the number: any fixed seed makes the run reproducible
EXAMPLES = int(os.environ.get("ENCORE_FUZZ_EXAMPLES", "50"))
MIN_CASES = int(os.environ.get("ENCORE_FUZZ_MIN_CASES", "500"))
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "unsupported_method", "finite_json")


def _schemathesis(server: Server, report_dir: Path) -> tuple[dict, str]:
    """Run the schemathesis CLI against ``server``; (its JSON report, its output tail)."""
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "--no-color", "run",
           f"{server.base_url}/openapi.json", "--header", f"Authorization: Bearer {API_KEY}",
           "--seed", str(SEED), "--max-examples", str(EXAMPLES), "--workers", "1",
           "--checks", ",".join(CHECKS), "--request-timeout", "60",
           "--report", "json", "--report-dir", str(report_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "SCHEMATHESIS_HOOKS": "tests.e2e.fuzz_hooks"}
    # its own directory: schemathesis keeps a cache of past failures (replayed first) in the
    # working directory, and a run must depend on the seed alone
    run = subprocess.run(cmd, cwd=report_dir.parent, env=env, capture_output=True, text=True,
                         timeout=3600)
    output = (run.stdout + run.stderr)[-6000:]
    reports = sorted(report_dir.glob("*.json"))
    assert reports, f"schemathesis wrote no report (exit {run.returncode}):\n{output}"
    return json.loads(reports[-1].read_text()), output


def _settled(server: Server) -> None:
    """Nothing left running or waiting, and only pins hold KV blocks."""
    deadline = time.monotonic() + 30
    while metric(server, "encore:num_requests_running") or metric(
            server, "encore:num_requests_waiting"):
        assert time.monotonic() < deadline, "requests still in the engine after the fuzz run"
        time.sleep(0.5)
    usage = metric(server, "encore:kv_cache_usage_perc")
    assert usage == 0 or metric(server, "encore:pinned_blocks") > 0, usage


def test_openapi_fuzz_finds_no_5xx_nan_or_schema_violation(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        start = time.monotonic()
        report, output = _schemathesis(server, tmp_path / "report")
        elapsed = time.monotonic() - start
        assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
        _settled(server)
    finally:
        stop_server(server)
    cases = report["test_cases"]
    print(f"\nschemathesis: {cases['generated']} cases in {elapsed:.0f}s, seed {SEED}, "
          f"{EXAMPLES} examples per operation, failures {len(report['failures'])}, "
          f"errors {len(report['errors'])}")
    assert report["failures"] == [] and report["errors"] == [], output
    assert cases["with_failures"] == 0 and cases["errored"] == 0, output
    assert report["operations"]["tested"] == report["operations"]["total"] == 8, output
    assert cases["generated"] >= MIN_CASES, output
    assert report["exit_code"] == 0, output

"""``encore generate``: offline completion with the embedded model, printed to stdout."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e.e2e_server import REPO

pytestmark = pytest.mark.slow


def test_generate_prints_a_completion() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "encore.server.cli", "generate", "--config", "test",
         "--prompt", "What is the capital of France?", "--max-tokens", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO), "TRITON_INTERPRET": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
    assert "loading the model" in proc.stderr  # progress on the terminal

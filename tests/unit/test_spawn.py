"""Child processes: the config (API keys included) never appears on a command line, and the
ipc directory of a child's sockets is removed when the parent closes them."""

from __future__ import annotations

import os
from pathlib import Path

import zmq

from encore.configs.loading import build_config
from encore.protocol.spawn import spawn_child


def test_the_config_travels_on_stdin_and_the_ipc_directory_goes_away(tmp_path: Path,
                                                                    monkeypatch) -> None:
    config = build_config(overrides={"api_keys": ["sk-very-secret"]})
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys, pathlib\n"
        "from encore.protocol.spawn import read_config\n"
        "c = read_config()\n"
        f"pathlib.Path({str(tmp_path / 'seen')!r}).write_text("
        "' '.join(sys.argv) + '\\n' + ','.join(c.server.api_keys))\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the child runs ``python -m probe``
    ctx = zmq.Context()
    child = spawn_child(ctx, "probe", config)
    try:
        assert child.proc.wait(timeout=60) == 0
    finally:
        child.close()
    argv, keys = (tmp_path / "seen").read_text().split("\n")
    assert keys == "sk-very-secret" and "sk-very-secret" not in argv
    assert not os.path.exists(child.ipc_dir)
    ctx.term()

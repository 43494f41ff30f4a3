"""What `pip install encore-serve` puts into site-packages: one import package, ``encore``.

Before the layout change the wheel installed top-level ``kernels``, ``server``, ``configs``...,
and the repo root on ``sys.path`` made transformers import our ``kernels`` instead of the
``kernels`` distribution it depends on.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_wheel_installs_only_the_encore_package(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("encore_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"encore"}
    assert "encore/configs/presets/cpu-small.yaml" in names  # presets ship with the package
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "encore = encore.server.cli:main" in text


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_transformers_hub_kernels_and_encore_kernels_side_by_side(cwd: str,
                                                                  tmp_path: Path) -> None:
    """From the repo root (``python -c`` puts the cwd first on ``sys.path``) and from
    anywhere else, ``kernels`` is the distribution transformers needs, not ours."""
    code = ("import transformers.integrations.hub_kernels as hub, kernels, encore.kernels as ours;"
            "from kernels import CUDAProperties;"
            "print(kernels.__file__); print(ours.__file__)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=REPO if cwd == "repo" else tmp_path).stdout.split()
    theirs, ours = map(Path, out)
    assert "site-packages" in theirs.parts
    assert ours == REPO / "encore" / "kernels" / "__init__.py"

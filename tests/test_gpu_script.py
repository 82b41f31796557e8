"""`bench/gpu.sh` where MLX does not compute on an NVIDIA GPU: it says so and stops with status 3, running
nothing else (the GPU steps themselves run on a GPU machine: bench/README.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mlx_sdxs import runtime

pytestmark = pytest.mark.policy_independent  # see pyproject.toml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(runtime.on_cuda(), reason="MLX computes on an NVIDIA GPU here: this checks the other case")
@pytest.mark.timeout(120)
def test_gpu_script_stops_saying_why_where_mlx_is_not_on_cuda(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(out)], capture_output=True, text=True,
                          timeout=100, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)})
    assert done.returncode == 3, done.stdout + done.stderr
    log = (out / "gpu.log").read_text()
    assert "MLX does not compute on an NVIDIA GPU here (install mlx[cuda13]" in log
    assert not (out / "suite.log").exists() and not (out / "gpu.txt").exists()

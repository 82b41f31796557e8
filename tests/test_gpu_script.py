"""`bench/gpu.sh` up to the step that needs a GPU: it joins split wheels, installs what it was given
without network, and where there is no CUDA GPU stops with status 3 saying so."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.policy_independent  # see pyproject.toml

ROOT = Path(__file__).resolve().parents[1]


def _wheel(path: Path, name: str) -> bytes:
    """A minimal valid wheel holding one module `name`."""
    dist = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}.py", "VALUE = 42\n" + "# padding\n" * 20000)
        archive.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        archive.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{dist}/RECORD", "")
    return path.read_bytes()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU is here: this checks the no-GPU path")
@pytest.mark.timeout(120)
def test_gpu_script_joins_installs_and_stops_where_there_is_no_gpu(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    data = _wheel(tmp_path / "fakegpu-1.0-py3-none-any.whl", "fakegpu")
    whole = wheels / "fakegpu-1.0-py3-none-any.whl"
    half = len(data) // 2
    (wheels / f"{whole.name}.part-00").write_bytes(data[:half])
    (wheels / f"{whole.name}.part-01").write_bytes(data[half:])
    out, site = tmp_path / "out", tmp_path / "site"
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(out), str(wheels)], capture_output=True,
                          text=True, timeout=100, env={**os.environ, "GPU_SITE": str(site),
                                                       "PATH": "/usr/bin:/bin:" + str(Path(os.sys.executable).parent)})
    assert done.returncode == 3, done.stdout + done.stderr
    assert hashlib.sha256(whole.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert (site / "fakegpu.py").is_file()
    log = (out / "gpu.log").read_text()
    assert "joined 2 parts" in log and "installed 1 wheels" in log
    assert "no CUDA GPU here (nvidia-smi finds none): stopping before the GPU steps" in log

"""`scripts/setup.sh` picks a Python that works, or stops at once saying what it found and how to get one."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.policy_independent  # see pyproject.toml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(30)
def test_with_only_an_old_python3_setup_fails_in_seconds_with_the_reason(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", checkout / "scripts" / "setup.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "uname", "id", "ldconfig", "grep"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    old = bin_dir / "python3"  # a Command Line Tools-style python3 3.9
    old.write_text('#!/bin/sh\ncase "$2" in *print*) echo 3.9 ;; *) exit 1 ;; esac\n')
    old.chmod(0o755)
    start = time.monotonic()
    done = subprocess.run(["/bin/bash", str(checkout / "scripts" / "setup.sh")], capture_output=True, text=True,
                          env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, timeout=20)
    assert time.monotonic() - start < 5
    assert done.returncode == 1
    assert "needs Python 3.10 or newer; found: python3=3.9" in done.stderr
    assert "brew install python@3.12" in done.stderr and "python.org" in done.stderr
    assert not (checkout / ".venv").exists()


def test_setup_takes_the_first_new_enough_python(tmp_path):
    """The picking function alone (no install): python3.13 missing, python3.12 new enough."""
    script = (ROOT / "scripts" / "setup.sh").read_text()
    picker = script[script.index("pick_python() {"):script.index("\n}\n") + 3]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, version in (("python3.12", "3.12"), ("python3", "3.9")):
        fake = bin_dir / name
        ok = "0" if version != "3.9" else "1"
        fake.write_text(f'#!/bin/sh\ncase "$2" in *print*) echo {version} ;; *) exit {ok} ;; esac\n')
        fake.chmod(0o755)
    done = subprocess.run(["/bin/bash", "-c", picker + "\npick_python"], capture_output=True, text=True,
                          env={"PATH": f"{bin_dir}:{os.defpath}"}, timeout=20)
    assert done.returncode == 0 and done.stdout.strip() == "python3.12"

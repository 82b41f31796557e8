"""Build the native CPU kernels in place: `python -m mlx_sdxs._native.build [--install-deps]`.

Configures and builds `CMakeLists.txt` with this interpreter (its MLX wheel's headers and CMake files,
nanobind, oneDNN), puts `_ext*.so` next to the sources and records what it was built against in
`build-info.json`, which `mlx_sdxs.native` checks before it imports the module. The record is removed
first, so a failed build leaves "not built" rather than a stale module. Exits 0 when built, 1 with one
line on stderr saying why not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_DIR = HERE / "build"
#: Written after the module linked: what it was built against (read by `mlx_sdxs.native` before importing it).
BUILD_INFO = HERE / "build-info.json"
#: Build-time Python packages: nanobind for the bindings; oneDNN 3.2 with GNU OpenMP (no SYCL/TBB runtime to
#: pull in; the newer `onednn` wheels are the SYCL build). CMake comes from PyPI only when none is installed.
BUILD_PACKAGES = ("nanobind>=2.4", "onednn-cpu-gomp==2023.2.0", "onednn-devel-cpu-gomp==2023.2.0")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _install(packages: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages],
                   check=True)


def build(install_deps: bool = False, jobs: int | None = None) -> str:
    """Build; returns the one-line result. Raises `RuntimeError` with the reason when it cannot."""
    import mlx.core as mx

    BUILD_INFO.unlink(missing_ok=True)
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++, g++ or clang++; or set CXX)")
    if install_deps:
        _install(list(BUILD_PACKAGES) + ([] if shutil.which("cmake") else ["cmake>=3.18"]))
    cmake = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if cmake is None:
        raise RuntimeError("no CMake (install it, or pass --install-deps for the PyPI one)")
    configure = [cmake, "-S", str(HERE), "-B", str(BUILD_DIR), f"-DPython_EXECUTABLE={sys.executable}",
                 f"-DCMAKE_CXX_COMPILER={compiler}", "-DCMAKE_BUILD_TYPE=Release"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    started = time.perf_counter()
    for command in (configure, [cmake, "--build", str(BUILD_DIR), "-j", str(jobs or os.cpu_count() or 1)]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            log = BUILD_DIR / "build-failure.log"
            BUILD_DIR.mkdir(parents=True, exist_ok=True)
            log.write_text(done.stdout + done.stderr)
            raise RuntimeError(f"{Path(command[0]).name} {' '.join(command[1:3])} failed (log: {log})")
    info = {"mlx": mx.__version__, "compiler": compiler, "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    BUILD_INFO.write_text(json.dumps(info, indent=2) + "\n")
    return f"built for mlx {mx.__version__} in {time.perf_counter() - started:.0f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_sdxs._native.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--install-deps", action="store_true",
                        help=f"pip-install the build-time packages first ({', '.join(BUILD_PACKAGES)})")
    parser.add_argument("-j", "--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        print(f"native CPU kernels: {build(args.install_deps, args.jobs)}")
    except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        print(f"native CPU kernels: not built ({exc}); the pure-MLX CPU kernels are used", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load an optimised BLAS before MLX starts, on Linux CPU.

The Linux `mlx[cpu]` wheel links a reference BLAS (~8 GFLOP/s GEMM on an AVX-512 core). Loading
OpenBLAS with RTLD_GLOBAL before `mlx.core` is imported makes MLX resolve its BLAS symbols there
(~30x faster matmul and conv). This module must run before anything imports `mlx.core`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import warnings

# Search order: an explicit override, then the common distro locations (Debian/Ubuntu multiarch,
# Fedora/Arch), then whatever the dynamic linker knows.
_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
)

FIX_HINT = "install OpenBLAS (Debian/Ubuntu: `apt-get install libopenblas0-pthread`) or set MLX_SDXS_BLAS=/path/to/libopenblas.so"

#: Path of the BLAS library loaded for MLX, None when MLX uses its bundled one (see `status()`).
loaded: str | None = None
_reason = "not attempted"


def _find() -> str | None:
    override = os.environ.get("MLX_SDXS_BLAS")
    if override:
        return override
    arch = os.uname().machine
    for pattern in _CANDIDATES:
        for path in glob.glob(pattern.format(arch=arch)):
            return path
    return ctypes.util.find_library("openblas")


def preload() -> None:
    """Load OpenBLAS globally if this is Linux and MLX is not imported yet; warn once if none is found."""
    global loaded, _reason
    if loaded is not None or sys.platform != "linux" or os.environ.get("MLX_SDXS_BLAS") == "off":
        _reason = "disabled by MLX_SDXS_BLAS=off" if os.environ.get("MLX_SDXS_BLAS") == "off" else _reason
        return
    if "mlx.core" in sys.modules:
        _reason = "mlx.core was imported before mlx_sdxs, too late to swap its BLAS"
        warnings.warn(f"mlx_sdxs: {_reason}; import mlx_sdxs first for fast CPU matmul", stacklevel=3)
        return
    path = _find()
    if path is None:
        _reason = "no OpenBLAS found"
        warnings.warn(
            "mlx_sdxs: no optimised BLAS found; MLX CPU matmul/conv will run ~30x slower. Fix: " + FIX_HINT,
            stacklevel=3,
        )
        return
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        _reason = f"could not load {path}: {exc}"
        warnings.warn(f"mlx_sdxs: {_reason}; MLX CPU will be ~30x slower. Fix: {FIX_HINT}", stacklevel=3)
        return
    loaded = path
    _reason = "loaded"


def status() -> str:
    """One line for `mlx-sdxs info`: which BLAS MLX's CPU backend uses."""
    if loaded:
        return f"OpenBLAS ({loaded})"
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    return f"MLX bundled reference BLAS ({_reason}; slow: {FIX_HINT})"

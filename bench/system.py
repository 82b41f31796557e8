"""The machine and software a bench run measured, written into its report beside the numbers."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import time
from pathlib import Path

import numpy as np


def system_info(args: argparse.Namespace, frames_note: str) -> dict:
    import mlx.core as mx

    from mlx_sdxs import __version__, _blas, native, runtime

    dtype = runtime.parse_dtype(args.dtype)
    described = runtime.describe(dtype)
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.machine(), "os": platform.platform(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "cpu": _cpu_name(),
        "mlx": mx.__version__, "mlx_device": described["device"], "mlx_sdxs": __version__,
        "mlx_blas": _blas.status(), "numpy": np.__version__,
        "dtype": described["dtype"], "kernels": described["kernels"], "kernels_requested": described["kernels_requested"],
        "native_kernels": native.status(),
        "openblas_env_unset_for_bench": os.environ.get("MLX_SDXS_BENCH_UNSET_OPENBLAS", "") or "none were set",
        "frames": frames_note, "preset": args.preset if args.checkpoint is None else str(args.checkpoint),
    }
    for package in ("torch", "diffusers", "onnxruntime", "coremltools"):
        try:
            info[package] = importlib.metadata.version(package)  # no import: coremltools is noisy off macOS
        except importlib.metadata.PackageNotFoundError:
            pass
    if args.device == "cuda" or runtime.on_cuda():
        try:
            import torch

            info["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
        except ImportError:
            pass
    try:
        from threadpoolctl import threadpool_info

        info["blas_kernels"] = sorted({f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')} "
                                       f"({p.get('num_threads')} threads)"
                                       for p in threadpool_info() if p.get("user_api") == "blas"})
    except ImportError:
        pass
    return info


def device_tag(info: dict) -> str:
    """A short name of the device MLX computed on, for result file names: `cpu`, or the GPU's model (`h200`)."""
    kind, _, name = info["mlx_device"].partition(" (")
    if kind == "cpu" or not name:
        return kind
    return name.rstrip(")").split()[-1].lower()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

"""The optional native CPU kernels (an MLX C++ extension). Not built in this version: the `cpu` policy
uses the pure-MLX rewrites of `models.cpu_ops`."""

from __future__ import annotations

from mlx_sdxs.models.cpu_ops import CPUOps


def cpu_ops(fallback: CPUOps) -> CPUOps:
    """The native kernel set when the extension loads, else `fallback`."""
    return fallback


def status() -> str:
    """One line for `mlx-sdxs info`."""
    return "not built"

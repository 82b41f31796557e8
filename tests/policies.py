"""The kernel policies' op sets this machine can run, and markers for tests bound to one kind of device.

The CPU rewrites are only ever chosen where MLX computes on the CPU, and the custom CUDA kernels only
compile on an NVIDIA GPU: each is tested where it runs and skipped elsewhere, saying why.
"""

from __future__ import annotations

import pytest

from mlx_sdxs import runtime
from mlx_sdxs.models.cpu_ops import CPUOps
from mlx_sdxs.models.cuda_ops import CUDAOps
from mlx_sdxs.models.ops import PORTABLE, PortableOps

ON_GPU = runtime.on_gpu()
ON_CUDA = runtime.on_cuda()
cpu_only = pytest.mark.skipif(ON_GPU, reason="CPU kernel code (the cpu policy's rewrites): MLX computes on the "
                                             "GPU here, where that policy is never chosen")
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="custom CUDA kernels: MLX does not compute on an NVIDIA GPU here")


def op_sets() -> dict[str, PortableOps]:
    """portable everywhere; cpu where MLX computes on the CPU; cuda on an NVIDIA GPU."""
    sets: dict[str, PortableOps] = {"portable": PORTABLE}
    if not ON_GPU:
        sets["cpu"] = CPUOps()
    if ON_CUDA:
        sets["cuda"] = CUDAOps()
    return sets

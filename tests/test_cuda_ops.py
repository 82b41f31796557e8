"""The `cuda` kernel policy: its custom kernels against the portable composition they replace, on an NVIDIA
GPU (elsewhere they cannot run and are skipped, saying so); the policy's refusal off CUDA runs everywhere.

Tolerances: float32 at 1e-5 of max|ref| (both sum in float32, in other orders); float16 and bfloat16 at
1e-2 and 2e-2 (the output's own rounding: 11 and 8 significant bits).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_sdxs import runtime
from mlx_sdxs.errors import ConfigError
from mlx_sdxs.models.cuda_ops import CUDAOps
from mlx_sdxs.models.layers import GroupNorm
from mlx_sdxs.models.ops import PORTABLE
from oracle import assert_parity
from policies import cuda_only
RTOL = {mx.float32: 1e-5, mx.float16: 1e-2, mx.bfloat16: 2e-2}


def _norm(channels: int, groups: int, seed: int) -> GroupNorm:
    mx.random.seed(seed)
    norm = GroupNorm(groups, channels, eps=1e-5)
    norm.weight = 1 + 0.5 * mx.random.normal((channels,))
    norm.bias = 0.5 * mx.random.normal((channels,))
    return norm


def _reference(norm: GroupNorm, x: mx.array, with_silu: bool) -> np.ndarray:
    """The portable composition in float32."""
    reference = GroupNorm(norm.num_groups, x.shape[-1], norm.eps)
    reference.weight, reference.bias = norm.weight.astype(mx.float32), norm.bias.astype(mx.float32)
    return np.array(PORTABLE.group_norm(reference, x.astype(mx.float32), with_silu))


@cuda_only
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize("with_silu", [False, True], ids=["norm", "norm+silu"])
@pytest.mark.parametrize("shape,groups", [((1, 64, 64, 320), 32), ((2, 16, 24, 1920), 32), ((1, 7, 5, 12), 4),
                                          ((3, 10, 64), 8)])
def test_group_norm_kernel_matches_the_portable_composition(shape, groups, with_silu, dtype):
    norm = _norm(shape[-1], groups, seed=shape[-1])
    norm.set_dtype(dtype)
    x = (3 * mx.random.normal(shape) + 1).astype(dtype)
    out = CUDAOps().group_norm(norm, x, with_silu)
    assert out.dtype == dtype and out.shape == x.shape
    assert_parity(np.array(out.astype(mx.float32)), _reference(norm, x, with_silu), RTOL[dtype])


@cuda_only
def test_group_norm_kernel_keeps_its_digits_when_the_mean_dwarfs_the_spread():
    """Mean 1000, std 0.01 (float32 keeps ~2.5 digits of each deviation): E[x²]−E[x]² would lose every
    digit of the variance, and a plain float32 sum of the mean 1 % of the output. Against float64."""
    norm = _norm(64, 8, seed=1)
    x = 1000 + 0.01 * mx.random.normal((1, 32, 32, 64))
    groups = np.array(x, np.float64).reshape(1, -1, 8, 8)
    normed = (groups - groups.mean(axis=(1, 3), keepdims=True)) / np.sqrt(groups.var(axis=(1, 3), keepdims=True) + 1e-5)
    expected = normed.reshape(x.shape) * np.array(norm.weight) + np.array(norm.bias)
    assert_parity(np.array(CUDAOps().group_norm(norm, x)), expected, 1e-4)


def test_the_cuda_policy_is_refused_where_mlx_does_not_compute_on_cuda():
    if runtime.on_cuda():
        assert runtime.resolve_kernels(mx.float16, "cuda") == "cuda"
        assert runtime.resolve_kernels(mx.float16, "auto") == "cuda"
        return
    with pytest.raises(ConfigError, match="needs MLX's CUDA backend"):
        runtime.resolve_kernels(mx.float32, "cuda")
    assert runtime.resolve_kernels(mx.float16, "auto") != "cuda"

"""PyTorch oracles for parity tests: seeded random weights, diffusers checkpoints, layout helpers.

Parity tolerance (fp32): max|mlx − torch| ≤ 1e-4 · max|torch| (see `assert_parity`).
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch

from mlx_sdxs.convert import convert_component

FP32_RTOL = 1e-4
SHARED = Path(__file__).resolve().parents[2] / "shared"


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter with seeded noise (norm scales and biases too, not just the default init).

    Weights get std 1/sqrt(fan_in) so activations stay O(1) through deep stacks; norm scales are
    1 ± 0.1 and biases ±0.05, so a swapped scale/bias or a missing bias shows in the output.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.ndim >= 2:
                fan_in = math.prod(param.shape[1:])
                param.copy_(noise / math.sqrt(fan_in))
            elif name.endswith("bias"):
                param.copy_(0.05 * noise)
            else:
                param.copy_(1.0 + 0.1 * noise)
    return module.eval()


def save_and_convert(model: torch.nn.Module, tmp: Path, component: str, dtype: str = "float32") -> Path:
    """`save_pretrained` as safetensors, then convert with mlx-sdxs; returns the MLX component folder."""
    src = tmp / f"{component}-diffusers"
    model.save_pretrained(src, safe_serialization=True)
    return convert_component(src, tmp / f"{component}-mlx", component, dtype)


def nchw_to_mlx(x: torch.Tensor) -> mx.array:
    return mx.array(x.detach().permute(0, 2, 3, 1).contiguous().numpy())


def mlx_to_nchw(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32)).transpose(0, 3, 1, 2)


def assert_parity(actual, expected, rtol: float = FP32_RTOL, what: str = "output") -> float:
    """Assert max-abs error ≤ rtol · max|expected|; returns the relative error for reporting."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected.detach().numpy() if torch.is_tensor(expected) else expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != reference {expected.shape}"
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    scale = np.abs(expected).max()
    err = np.abs(actual - expected).max() / max(scale, 1e-12)
    assert err <= rtol, f"{what}: max-abs error {err:.3g}·max|ref| exceeds {rtol:g} (max|ref| = {scale:.3g})"
    return err

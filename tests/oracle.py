"""PyTorch oracles for parity tests: seeded random weights, diffusers checkpoints, layout helpers, and a
cache of reference results that the suite's two runs (kernel policies `cpu` and `portable`) share.

Parity tolerance (fp32): max|mlx − torch| ≤ 1e-4 · max|torch| (see `assert_parity`).

`cached(key, build)`: the folder `build` filled for `key`, built once. With $MLX_SDXS_TEST_CACHE set
(`.ci/run` sets it) the folders outlive the run, so the second policy's run reuses the converted
weights and torch outputs of the first; otherwise they live in one temporary folder per run.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
import torch

from mlx_sdxs.convert import convert_component

FP32_RTOL = 1e-4
SHARED = Path(__file__).resolve().parents[2] / "shared"
CACHE_ENV = "MLX_SDXS_TEST_CACHE"


def _cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
        root.mkdir(parents=True, exist_ok=True)
        return root
    root = Path(tempfile.mkdtemp(prefix="mlx-sdxs-oracles-"))
    atexit.register(shutil.rmtree, root, True)
    return root


_ROOT: Path | None = None


def cached(key: object, build: Callable[[Path], None]) -> Path:
    """A folder holding what `build(folder)` wrote for `key` (any JSON-able value), built once."""
    global _ROOT
    _ROOT = _ROOT or _cache_root()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = _ROOT / digest
    if (folder / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=_ROOT))
    try:
        build(staging)
        (staging / ".complete").write_text(json.dumps(key, sort_keys=True, default=str))
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


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


def save_and_convert(model: torch.nn.Module, tmp: Path, component: str, dtype: str = "float32",
                     keep_source: bool = True) -> Path:
    """`save_pretrained` as safetensors, then convert with mlx-sdxs; returns the MLX component folder."""
    src = tmp / f"{component}-diffusers"
    model.save_pretrained(src, safe_serialization=True)
    converted = convert_component(src, tmp / f"{component}-mlx", component, dtype)
    if not keep_source:
        shutil.rmtree(src)
    return converted


def expected_ops(dtype: mx.Dtype = mx.float32) -> str:
    """The ops name a model loaded now in `dtype` must have (the suite runs under $MLX_SDXS_KERNELS)."""
    from mlx_sdxs import runtime

    return runtime.ops_for(runtime.resolve_kernels(dtype)).name


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


def ops_name(model) -> str:
    """The kernel set a loaded model computes with (every op-using module has the same)."""
    from mlx_sdxs.models.ops import UsesOps

    names = {m.ops.name for _, m in model.named_modules() if isinstance(m, UsesOps)}
    assert len(names) == 1, f"modules disagree on their ops: {names}"
    return names.pop()

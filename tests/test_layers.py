"""`mlx_sdxs.models.layers` against `mx.conv2d` / `nn.GroupNorm` and PyTorch.

Every CPU formulation (Winograd F(2,3)/F(4,3), per-tap GEMMs at stride 1 and 2, 1×1 matmul, the
`mx.conv2d` fallback) is checked on odd sizes, batch 2 and padding 0/1/2 against float64 PyTorch.
Tolerance: fp32 max-abs error ≤ 1e-4 · max|ref| (Winograd F(4,3) measures ~1.5e-5 at 320–1920
input channels); fp16 ≤ 1e-2. Runtime ~10 s on 2 cores.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import FP32_RTOL, assert_parity, mlx_to_nchw

from mlx_sdxs.models.layers import Conv2d, GroupNorm, attention, reserve_cpu_buffer_cache, silu

FP16_RTOL = 1e-2


def _conv(in_c: int, out_c: int, kernel: int, stride: int, padding: int, bias: bool, seed: int) -> Conv2d:
    mx.random.seed(seed)
    conv = Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, bias=bias)
    if bias:
        conv.bias = mx.random.normal((out_c,)) * 0.1
    return conv


def _torch_reference(conv: Conv2d, x: mx.array) -> torch.Tensor:
    """Float64 PyTorch conv with the same weights (OHWI → OIHW)."""
    weight = torch.from_numpy(np.array(conv.weight.astype(mx.float32))).permute(0, 3, 1, 2).double()
    bias = torch.from_numpy(np.array(conv.bias.astype(mx.float32))).double() if "bias" in conv else None
    xt = torch.from_numpy(mlx_to_nchw(x)).double()
    return F.conv2d(xt, weight, bias, stride=conv.stride, padding=conv.padding)


# (in, out, kernel, stride, padding, H, W, expected CPU formulation)
CASES = [
    (128, 136, 3, 1, 1, 33, 35, "winograd4"),
    (136, 128, 3, 1, 1, 17, 9, "winograd2"),
    (128, 128, 3, 1, 0, 13, 11, "winograd2"),
    (128, 160, 3, 1, 2, 34, 40, "winograd4"),
    (24, 40, 3, 1, 1, 19, 23, "taps"),
    (24, 8, 3, 1, 0, 10, 7, "taps"),
    (32, 24, 3, 2, 1, 21, 18, "taps"),
    (32, 24, 3, 2, 0, 22, 15, "taps"),
    (24, 16, 5, 1, 2, 12, 9, "taps"),
    (24, 16, 1, 2, 0, 9, 11, "taps"),
    (136, 128, 3, 2, 1, 17, 16, "conv2d"),
    (48, 40, 1, 1, 0, 7, 5, "matmul"),
    (3, 24, 3, 1, 1, 15, 13, "conv2d"),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_c,out_c,kernel,stride,padding,h,w,formulation", CASES)
def test_conv_matches_torch_and_mx(in_c, out_c, kernel, stride, padding, h, w, formulation, bias):
    conv = _conv(in_c, out_c, kernel, stride, padding, bias, seed=in_c + out_c + h)
    x = mx.random.normal((2, h, w, in_c))
    assert conv._formulation(x) == formulation
    y = conv(x)
    assert_parity(mlx_to_nchw(y), _torch_reference(conv, x).numpy(), FP32_RTOL, what=formulation)
    reference = mx.conv2d(x, conv.weight, conv.stride, conv.padding) + (conv.bias if bias else 0)
    assert_parity(np.array(y), np.array(reference), FP32_RTOL, what=f"{formulation} vs mx.conv2d")


@pytest.mark.parametrize("in_c,out_c,kernel,stride,padding,h,w,formulation", CASES[::3])
def test_conv_fp16(in_c, out_c, kernel, stride, padding, h, w, formulation):
    conv = _conv(in_c, out_c, kernel, stride, padding, True, seed=7)
    conv.set_dtype(mx.float16)
    x = mx.random.normal((2, h, w, in_c)).astype(mx.float16)
    y = conv(x)
    assert y.dtype == mx.float16
    assert_parity(mlx_to_nchw(y), _torch_reference(conv, x).numpy(), FP16_RTOL, what=f"fp16 {formulation}")


def test_winograd_at_sdxs_widths():
    """F(4,3)'s error grows with the reduction length: check the widest UNet input (1920 channels)."""
    conv = _conv(1920, 640, 3, 1, 1, True, seed=3)
    x = mx.random.normal((1, 32, 32, 1920))
    assert conv._formulation(x) == "winograd4"
    assert_parity(mlx_to_nchw(conv(x)), _torch_reference(conv, x).numpy(), FP32_RTOL)


def test_winograd_cache_follows_reloaded_weights(tmp_path):
    conv = _conv(128, 128, 3, 1, 1, True, seed=1)
    x = mx.random.normal((1, 16, 16, 128))
    first = conv(x)
    other = _conv(128, 128, 3, 1, 1, True, seed=2)
    other.save_weights(str(tmp_path / "w.safetensors"))
    conv.load_weights(str(tmp_path / "w.safetensors"))
    assert_parity(np.array(conv(x)), np.array(other(x)), FP32_RTOL)
    assert not np.allclose(np.array(first), np.array(conv(x)))
    conv.weight = conv.weight * 2  # plain reassignment also invalidates
    assert_parity(np.array(conv(x)), 2 * np.array(other(x)) - np.array(other.bias), FP32_RTOL)


def test_conv_parameters_mirror_nn_conv2d():
    ours, theirs = Conv2d(8, 16, 3, stride=2, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
    shapes = lambda m: {k: v.shape for k, v in nn.utils.tree_flatten(m.parameters())}
    assert shapes(ours) == shapes(theirs)
    assert "bias" not in Conv2d(8, 16, 1, bias=False)


def test_conv_defers_to_mx_conv2d_off_cpu(monkeypatch):
    from mlx_sdxs.models import layers

    monkeypatch.setattr(layers, "on_cpu", lambda: False)
    conv = _conv(128, 128, 3, 1, 1, True, seed=4)
    x = mx.random.normal((1, 8, 8, 128))
    assert conv._formulation(x) == "conv2d"
    assert_parity(np.array(conv(x)), np.array(mx.conv2d(x, conv.weight, padding=1) + conv.bias), 0)


@pytest.mark.parametrize("shape,groups", [((2, 9, 7, 64), 32), ((1, 16, 16, 96), 32), ((2, 5, 3, 24), 4)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_group_norm_matches_torch(shape, groups, dtype):
    channels = shape[-1]
    norm = GroupNorm(groups, channels, eps=1e-6)
    norm.weight = 1 + 0.1 * mx.random.normal((channels,))
    norm.bias = 0.05 * mx.random.normal((channels,))
    x = (mx.random.normal(shape) * 3 + 5).astype(dtype)  # offset mean: catches one-pass variance
    rtol = FP32_RTOL if dtype == mx.float32 else FP16_RTOL
    y = norm(x)
    assert y.dtype == dtype
    expected = F.group_norm(torch.from_numpy(mlx_to_nchw(x)).double(), groups,
                            torch.from_numpy(np.array(norm.weight)).double(),
                            torch.from_numpy(np.array(norm.bias)).double(), eps=1e-6)
    assert_parity(mlx_to_nchw(y), expected.numpy(), rtol)
    mx_norm = nn.GroupNorm(groups, channels, eps=1e-6, pytorch_compatible=True)
    mx_norm.update(norm.parameters())
    assert_parity(np.array(y.astype(mx.float32)), np.array(mx_norm(x.astype(mx.float32))), rtol)
    fused = norm(x, with_silu=True)  # one pass on CPU
    assert fused.dtype == dtype
    assert_parity(mlx_to_nchw(fused), F.silu(expected).numpy(), rtol)


def test_silu_matches_torch_over_the_float_range():
    x = mx.concatenate([mx.linspace(-100, 100, 20001), mx.array([-1e30, 1e30, 0.0])])
    expected = F.silu(torch.from_numpy(np.array(x)).double()).numpy()
    actual = np.array(silu(x))
    assert np.isfinite(actual).all()
    assert np.abs(actual - expected).max() <= 1e-6 * np.maximum(np.abs(expected), 1).max()
    np.testing.assert_allclose(actual[:20001], expected[:20001], rtol=1e-6, atol=1e-30)
    assert silu(x.astype(mx.float16)).dtype == mx.float16


@pytest.mark.parametrize("heads,tokens,keys,head_dim", [(10, 257, 257, 64), (5, 300, 77, 64), (1, 64, 64, 512)])
def test_attention_matches_torch(heads, tokens, keys, head_dim):
    """The CPU path (matmuls around a polynomial-exp softmax, normalised after the value product) against
    float64 torch, with logits large enough that the max-shift matters."""
    mx.random.seed(heads)
    q = mx.random.normal((2, heads, tokens, head_dim)) * 4
    k, v = mx.random.normal((2, heads, keys, head_dim)) * 4, mx.random.normal((2, heads, keys, head_dim))
    scale = head_dim**-0.5
    expected = F.scaled_dot_product_attention(*(torch.from_numpy(np.array(t)).double() for t in (q, k, v)),
                                              scale=scale).numpy()
    assert_parity(np.array(attention(q, k, v, scale)), expected, FP32_RTOL)


def test_cpu_buffer_cache_is_raised_never_lowered():
    """MLX keeps only 32 MiB of freed CPU buffers by default; the pipeline raises that (page faults on
    every 64 MiB activation otherwise) but must not shrink a limit the user set higher."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    original = mx.set_cache_limit(32 << 20)
    try:
        reserve_cpu_buffer_cache()
        assert mx.set_cache_limit(64 << 30) == min(4 << 30, ram // 4)
        reserve_cpu_buffer_cache()
        assert mx.set_cache_limit(original) == 64 << 30
    finally:
        mx.set_cache_limit(original)

"""The policy-dependent ops (`models.ops.PortableOps`, `models.cpu_ops.CPUOps`) against float64 PyTorch.

Every CPU conv formulation (Winograd F(2,3)/F(4,3), per-tap GEMMs at stride 1 and 2, 1×1 matmul, the
`mx.conv2d` fallback) and the portable conv run on odd sizes, batch 2 and padding 0/1/2. Tolerance:
fp32 max-abs error ≤ 1e-4 · max|ref| (Winograd F(4,3) measures ~1.5e-5 at 320–1920 input channels);
fp16 ≤ 1e-2. Runtime ~15 s on 2 cores.
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
from policies import cpu_only, op_sets

from mlx_sdxs import runtime
from mlx_sdxs.models.cpu_ops import CPUOps
from mlx_sdxs.models.layers import Conv2d, GroupNorm
from mlx_sdxs.models.ops import PORTABLE, gelu, set_ops

FP16_RTOL = 1e-2
CPU = CPUOps()
OPS = op_sets()


def _conv(in_c: int, out_c: int, kernel: int, stride: int, padding: int, bias: bool, seed: int, ops=PORTABLE) -> Conv2d:
    mx.random.seed(seed)
    conv = Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, bias=bias)
    if bias:
        conv.bias = mx.random.normal((out_c,)) * 0.1
    set_ops(conv, ops)
    return conv


def _torch_reference(conv: Conv2d, x: mx.array) -> torch.Tensor:
    """Float64 PyTorch conv with the same weights (OHWI → OIHW)."""
    weight = torch.from_numpy(np.array(conv.weight.astype(mx.float32))).permute(0, 3, 1, 2).double()
    bias = torch.from_numpy(np.array(conv.bias.astype(mx.float32))).double() if "bias" in conv else None
    xt = torch.from_numpy(mlx_to_nchw(x)).double()
    return F.conv2d(xt, weight, bias, stride=conv.stride, padding=conv.padding)


# (in, out, kernel, stride, padding, H, W, expected CPU formulation)
CASES = [
    (640, 136, 3, 1, 1, 33, 35, "winograd4"),
    (1280, 128, 3, 1, 1, 17, 19, "winograd2"),
    (1280, 128, 3, 1, 0, 18, 17, "winograd2"),
    (640, 160, 3, 1, 2, 34, 40, "winograd4"),
    (128, 136, 3, 1, 1, 33, 35, "conv2d"),  # too narrow for Winograd to pay (measured)
    (24, 40, 3, 1, 1, 65, 67, "taps"),
    (24, 40, 3, 1, 1, 19, 23, "conv2d"),  # too small a map for taps to pay
    (24, 8, 3, 1, 0, 10, 7, "taps"),  # thin output
    (32, 24, 3, 2, 1, 257, 258, "taps"),
    (32, 24, 3, 2, 0, 256, 259, "taps"),
    (24, 16, 5, 1, 2, 64, 65, "taps"),
    (24, 16, 1, 2, 0, 256, 257, "taps"),
    (136, 128, 3, 2, 1, 17, 16, "conv2d"),
    (48, 40, 1, 1, 0, 7, 5, "matmul"),
    (3, 24, 3, 1, 1, 15, 13, "conv2d"),
]


@cpu_only
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_c,out_c,kernel,stride,padding,h,w,formulation", CASES)
def test_cpu_conv_formulations_match_torch(in_c, out_c, kernel, stride, padding, h, w, formulation, bias):
    conv = _conv(in_c, out_c, kernel, stride, padding, bias, seed=in_c + out_c + h, ops=CPU)
    x = mx.random.normal((2, h, w, in_c))
    assert CPU.conv_formulation(conv, x) == formulation
    assert_parity(mlx_to_nchw(conv(x)), _torch_reference(conv, x).numpy(), FP32_RTOL, what=formulation)


@pytest.mark.parametrize("in_c,out_c,kernel,stride,padding,h,w,formulation", CASES[::2])
def test_portable_conv_matches_torch(in_c, out_c, kernel, stride, padding, h, w, formulation):
    """`mx.conv2d`, what Metal and CUDA run, against torch (not against itself)."""
    conv = _conv(in_c, out_c, kernel, stride, padding, True, seed=in_c + out_c + h)
    x = mx.random.normal((2, h, w, in_c))
    assert_parity(mlx_to_nchw(conv(x)), _torch_reference(conv, x).numpy(), FP32_RTOL, what="portable conv")


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("in_c,out_c,kernel,stride,padding,h,w,formulation", CASES[::3])
def test_conv_fp16(ops, in_c, out_c, kernel, stride, padding, h, w, formulation):
    """float16 in, float16 out; the CPU rewrites hand half precision to the portable path."""
    conv = _conv(in_c, out_c, kernel, stride, padding, True, seed=7, ops=OPS[ops])
    conv.set_dtype(mx.float16)
    x = mx.random.normal((2, h, w, in_c)).astype(mx.float16)
    assert CPU.conv_formulation(conv, x) == "conv2d"
    y = conv(x)
    assert y.dtype == mx.float16
    assert_parity(mlx_to_nchw(y), _torch_reference(conv, x).numpy(), FP16_RTOL, what=f"fp16 {formulation}")


@cpu_only
def test_winograd_at_sdxs_widths():
    """F(4,3)'s error grows with the reduction length: check the widest UNet input (1920 channels)."""
    conv = _conv(1920, 640, 3, 1, 1, True, seed=3, ops=CPU)
    x = mx.random.normal((1, 32, 32, 1920))
    assert CPU.conv_formulation(conv, x) == "winograd4"
    assert_parity(mlx_to_nchw(conv(x)), _torch_reference(conv, x).numpy(), FP32_RTOL)


@cpu_only
def test_winograd_cache_follows_reloaded_weights(tmp_path):
    conv = _conv(1280, 128, 3, 1, 1, True, seed=1, ops=CPU)
    x = mx.random.normal((1, 16, 16, 1280))
    assert CPU.conv_formulation(conv, x) == "winograd2"
    first = conv(x)
    other = _conv(1280, 128, 3, 1, 1, True, seed=2, ops=CPU)
    other.save_weights(str(tmp_path / "w.safetensors"))
    conv.load_weights(str(tmp_path / "w.safetensors"))
    assert_parity(np.array(conv(x)), np.array(other(x)), FP32_RTOL)
    assert not np.allclose(np.array(first), np.array(conv(x)))
    conv.weight = conv.weight * 2  # plain reassignment also invalidates
    assert_parity(np.array(conv(x)), 2 * np.array(other(x)) - np.array(other.bias), FP32_RTOL)


def test_conv_parameters_mirror_nn_conv2d():
    ours, theirs = Conv2d(8, 16, 3, stride=2, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
    shapes = lambda m: {k: v.shape for k, v in nn.utils.tree_flatten(m.parameters())}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert "bias" not in Conv2d(8, 16, 1, bias=False)
    assert "ops" not in dict(nn.utils.tree_flatten(ours.parameters()))  # the ops are not a parameter


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("shape,groups", [((2, 9, 7, 64), 32), ((1, 16, 16, 96), 32), ((2, 5, 3, 24), 4)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_group_norm_matches_torch(ops, shape, groups, dtype):
    channels = shape[-1]
    norm = GroupNorm(groups, channels, eps=1e-6)
    set_ops(norm, OPS[ops])
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
    fused = norm(x, with_silu=True)
    assert fused.dtype == dtype
    assert_parity(mlx_to_nchw(fused), F.silu(expected).numpy(), rtol)


@pytest.mark.parametrize("ops", OPS)
def test_silu_matches_torch_over_the_float_range(ops):
    x = mx.concatenate([mx.linspace(-100, 100, 20001), mx.array([-1e30, 1e30, 0.0])])
    expected = F.silu(torch.from_numpy(np.array(x)).double()).numpy()
    actual = np.array(OPS[ops].silu(x))
    assert np.isfinite(actual).all()
    assert np.abs(actual - expected).max() <= 1e-6 * np.maximum(np.abs(expected), 1).max()
    # The CPU set's polynomial exp is bounded at 1e-6 relative; MLX's sigmoid measures ~3e-6 in the tails.
    np.testing.assert_allclose(actual[:20001], expected[:20001], rtol=1e-6 if ops == "cpu" else 1e-5, atol=1e-30)
    assert OPS[ops].silu(x.astype(mx.float16)).dtype == mx.float16


@pytest.mark.parametrize("ops", OPS)
def test_geglu_matches_erf_gelu(ops):
    """value · GELU(gate); the CPU set uses a rational erf (bounded here), portable uses `mx.erf`."""
    gate = torch.linspace(-10, 10, 20001)
    value = torch.linspace(-3, 3, 20001)
    expected = (value.double() * F.gelu(gate.double())).numpy()
    actual = np.array(OPS[ops].geglu(mx.array(value.numpy()), mx.array(gate.numpy())))
    assert np.abs(actual - expected).max() < 6e-6


def test_gelu_keeps_large_inputs_finite_in_float16():
    """x·Φ(x) with Φ first: 40000 stays 40000 (x·(1+erf)/2 would pass through 80000 → inf)."""
    x = mx.array([40000.0, -40000.0, 3.0], dtype=mx.float16)
    np.testing.assert_allclose(np.array(gelu(x).astype(mx.float32)), [40000.0, 0.0, 2.996], rtol=2e-3)


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("heads,tokens,keys,head_dim", [(10, 257, 257, 64), (5, 300, 77, 64), (1, 64, 64, 512)])
def test_attention_matches_torch(ops, heads, tokens, keys, head_dim):
    """Against float64 torch, with logits large enough that the max-shift matters."""
    mx.random.seed(heads)
    q = mx.random.normal((2, heads, tokens, head_dim)) * 4
    k, v = mx.random.normal((2, heads, keys, head_dim)) * 4, mx.random.normal((2, heads, keys, head_dim))
    scale = head_dim**-0.5
    expected = F.scaled_dot_product_attention(*(torch.from_numpy(np.array(t)).double() for t in (q, k, v)),
                                              scale=scale).numpy()
    assert_parity(np.array(OPS[ops].attention(q, k, v, scale)), expected, FP32_RTOL)


@pytest.mark.parametrize("ops", OPS)
def test_causal_attention_matches_torch(ops):
    mx.random.seed(3)
    q, k, v = (mx.random.normal((1, 4, 77, 64)) for _ in range(3))
    expected = F.scaled_dot_product_attention(*(torch.from_numpy(np.array(t)).double() for t in (q, k, v)),
                                              is_causal=True, scale=0.125).numpy()
    assert_parity(np.array(OPS[ops].attention(q, k, v, 0.125, causal=True)), expected, FP32_RTOL)


@pytest.mark.skipif(runtime.on_gpu(), reason="the buffer cache is raised on the CPU only")
def test_cpu_buffer_cache_is_raised_never_lowered():
    """MLX keeps only 32 MiB of freed CPU buffers by default; the pipeline raises that (page faults on
    every 64 MiB activation otherwise) but must not shrink a limit the user set higher."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    original = mx.set_cache_limit(32 << 20)
    try:
        runtime.reserve_cpu_buffer_cache()
        assert mx.set_cache_limit(64 << 30) == min(4 << 30, ram // 4)
        runtime.reserve_cpu_buffer_cache()
        assert mx.set_cache_limit(original) == 64 << 30
    finally:
        mx.set_cache_limit(original)

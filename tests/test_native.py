"""The native CPU kernels (`mlx_sdxs.native`, `mlx_sdxs/_native`): each primitive against the MLX built-in
and float64 PyTorch, NativeOps' fallbacks, and the loader's refusals (no build, another MLX, switched off).

Tolerance: fp32 max-abs error ≤ 1e-4 · max|ref| (oneDNN's direct convolutions measure ~1e-6). The parity
tests skip, saying why, where the extension is not built; the loader tests need no build. ~5 s on 2 cores.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import FP32_RTOL, assert_parity, mlx_to_nchw

from mlx_sdxs import native, runtime
from mlx_sdxs._native import build as native_build
from mlx_sdxs.models.cpu_ops import CPUOps
from mlx_sdxs.models.layers import Conv2d, GroupNorm
from mlx_sdxs.models.ops import PORTABLE, set_ops

pytestmark = pytest.mark.policy_independent  # the op sets are pinned here

EXT, REASON = native.load()
needs_ext = pytest.mark.skipif(EXT is None or runtime.on_gpu(), reason=f"native CPU kernels {REASON}")
NATIVE = native.NativeOps(EXT) if EXT is not None else None


def _conv(in_c: int, out_c: int, kernel: int, stride: int, padding: int, bias: bool, seed: int) -> Conv2d:
    mx.random.seed(seed)
    conv = Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, bias=bias)
    if bias:
        conv.bias = mx.random.normal((out_c,)) * 0.1
    return conv


def _torch_conv(conv: Conv2d, x: mx.array, residual: mx.array | None, activation: str | None) -> np.ndarray:
    """Float64 PyTorch: activation(conv(x) + bias + residual), NCHW."""
    weight = torch.from_numpy(np.array(conv.weight)).permute(0, 3, 1, 2).double()
    bias = torch.from_numpy(np.array(conv.bias)).double() if "bias" in conv else None
    y = F.conv2d(torch.from_numpy(mlx_to_nchw(x)).double(), weight, bias, stride=conv.stride, padding=conv.padding)
    if residual is not None:
        y = y + torch.from_numpy(mlx_to_nchw(residual)).double()
    return {None: y, "relu": F.relu(y), "silu": F.silu(y)}[activation].numpy()


def _primitives(out: mx.array) -> list[str]:
    """The primitives of the unevaluated graph behind `out`, from MLX's graph export (`out`'s own last)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "graph.dot"
        mx.export_to_dot(str(path), out)
        return re.findall(r'label ="([^"]+)", shape=rectangle', path.read_text())


def _primitive(out: mx.array) -> str:
    return _primitives(out)[-1]


# (in, out, kernel, stride, padding, H, W): TAESD, UNet and VAE shapes, odd sizes, thin in/outputs.
CONV_CASES = [
    (64, 64, 3, 1, 1, 33, 35),
    (64, 64, 3, 2, 1, 34, 31),
    (3, 64, 3, 1, 1, 17, 19),
    (64, 3, 3, 1, 1, 18, 16),
    (4, 320, 3, 1, 1, 9, 8),
    (320, 4, 3, 1, 1, 9, 8),
    (640, 136, 3, 1, 1, 11, 13),
    (48, 40, 1, 1, 0, 7, 5),
    (24, 16, 5, 1, 2, 20, 21),
    (32, 24, 3, 2, 0, 20, 23),
    (24, 16, 1, 2, 0, 15, 16),
]


@needs_ext
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_c,out_c,kernel,stride,padding,h,w", CONV_CASES)
def test_conv_matches_builtin_and_torch(in_c, out_c, kernel, stride, padding, h, w, bias):
    conv = _conv(in_c, out_c, kernel, stride, padding, bias, seed=in_c + out_c + h)
    x = mx.random.normal((2, h, w, in_c))
    actual = NATIVE.conv2d(conv, x)
    assert _primitive(actual) == "SdxsConv2d"
    assert_parity(np.array(actual), np.array(PORTABLE.conv2d(conv, x)), FP32_RTOL, what="vs mx.conv2d")
    assert_parity(mlx_to_nchw(actual), _torch_conv(conv, x, None, None), FP32_RTOL, what="vs torch")


@needs_ext
@pytest.mark.parametrize("activation", [None, "relu", "silu"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("in_c,out_c,kernel,stride,padding,h,w", [CONV_CASES[0], CONV_CASES[1], CONV_CASES[7]])
def test_conv_epilogues_match_builtin_and_torch(in_c, out_c, kernel, stride, padding, h, w, with_residual, activation):
    """Bias, residual and activation fused as oneDNN post-ops, against the separate built-in ops."""
    conv = _conv(in_c, out_c, kernel, stride, padding, True, seed=7)
    x = mx.random.normal((2, h, w, in_c))
    out_shape = PORTABLE.conv2d(conv, x).shape
    residual = mx.random.normal(out_shape) if with_residual else None
    actual = NATIVE.conv2d(conv, x, residual=residual, activation=activation)
    assert _primitive(actual) == "SdxsConv2d"
    expected = PORTABLE.conv2d(conv, x, residual=residual, activation=activation)
    assert_parity(np.array(actual), np.array(expected), FP32_RTOL, what="vs built-in")
    assert_parity(mlx_to_nchw(actual), _torch_conv(conv, x, residual, activation), FP32_RTOL, what="vs torch")


@needs_ext
def test_conv_follows_replaced_weights_and_input_sizes(tmp_path):
    """The packed-weight cache keys on the weight buffer: reloading or reassigning weights repacks."""
    conv, other = _conv(64, 64, 3, 1, 1, True, seed=1), _conv(64, 64, 3, 1, 1, True, seed=2)
    set_ops(conv, NATIVE)
    set_ops(other, NATIVE)
    small, large = mx.random.normal((1, 16, 16, 64)), mx.random.normal((1, 40, 24, 64))
    first = np.array(conv(small))
    other.save_weights(str(tmp_path / "w.safetensors"))
    conv.load_weights(str(tmp_path / "w.safetensors"))
    assert_parity(np.array(conv(small)), np.array(other(small)), FP32_RTOL)
    assert not np.allclose(first, np.array(conv(small)))
    conv.weight = conv.weight * 2
    for x in (small, large):
        assert_parity(np.array(conv(x)), 2 * np.array(other(x)) - np.array(other.bias), FP32_RTOL)


@needs_ext
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch,h,w,in_c,out_c", [(1, 64, 64, 64, 64), (2, 5, 7, 24, 24), (1, 8, 8, 1280, 1280),
                                                  (2, 3, 2, 16, 8), (1, 1, 1, 4, 4)])
def test_upsample_conv_matches_upsample_then_conv_and_torch(batch, h, w, in_c, out_c, bias):
    """Nearest-2× upsample + 3×3 conv as a 2×2 phase convolution and an interleave, against the built-ins and
    float64 torch (`interpolate` then `conv2d`); the folded taps reorder sums, ~1e-6 relative."""
    conv = _conv(in_c, out_c, 3, 1, 1, bias, seed=h + w + in_c)
    x = mx.random.normal((batch, h, w, in_c))
    actual = NATIVE.upsample_conv2d(conv, x, (2 * h, 2 * w))
    assert _primitive(actual) == "SdxsPhaseInterleave" and actual.shape == (batch, 2 * h, 2 * w, out_c)
    expected = PORTABLE.upsample_conv2d(conv, x, (2 * h, 2 * w))
    assert_parity(np.array(actual), np.array(expected), FP32_RTOL, what="vs upsample + mx.conv2d")
    weight = torch.from_numpy(np.array(conv.weight)).permute(0, 3, 1, 2).double()
    bias_t = torch.from_numpy(np.array(conv.bias)).double() if bias else None
    upsampled = F.interpolate(torch.from_numpy(mlx_to_nchw(x)).double(), scale_factor=2, mode="nearest")
    assert_parity(mlx_to_nchw(actual), F.conv2d(upsampled, weight, bias_t, padding=1).numpy(), FP32_RTOL,
                  what="vs torch")


@needs_ext
def test_upsample_conv_repacks_replaced_weights_and_falls_back_for_other_cases():
    conv = _conv(8, 8, 3, 1, 1, True, seed=3)
    x = mx.random.normal((1, 6, 4, 8))
    first = np.array(NATIVE.upsample_conv2d(conv, x, (12, 8)))
    conv.weight = conv.weight * 2
    assert_parity(np.array(NATIVE.upsample_conv2d(conv, x, (12, 8))), 2 * first - np.array(conv.bias), FP32_RTOL)
    conv.bias = conv.bias + 1  # the cached phase bias follows a replaced bias
    assert_parity(np.array(NATIVE.upsample_conv2d(conv, x, (12, 8))), 2 * first - np.array(conv.bias) + 2,
                  FP32_RTOL)
    # Another factor, a 1×1 kernel, float16: the upsample and conv2d of the pure-MLX set.
    pointwise = _conv(8, 8, 1, 1, 0, True, seed=4)
    for layer, size, inputs in ((conv, (18, 12), x), (pointwise, (12, 8), x), (conv, (12, 8), x.astype(mx.float16))):
        if inputs.dtype == mx.float16:
            layer.set_dtype(mx.float16)
        actual = NATIVE.upsample_conv2d(layer, inputs, size)
        assert _primitive(actual) != "SdxsPhaseInterleave"
        np.testing.assert_array_equal(np.array(actual), np.array(CPUOps().upsample_conv2d(layer, inputs, size)))


@needs_ext
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,out_c", [((1, 4096, 320), 2560), ((2, 77, 1024), 640), ((5, 1280), 1280), ((3, 7, 9), 5)])
def test_linear_matches_matmul_and_torch(shape, out_c, bias):
    layer = nn.Linear(shape[-1], out_c, bias=bias)
    x = mx.random.normal(shape)
    actual = NATIVE.linear(layer, x)
    assert "SdxsConv2d" in _primitives(actual) and actual.shape == (*shape[:-1], out_c)
    assert_parity(np.array(actual), np.array(layer(x)), FP32_RTOL, what="vs nn.Linear")
    expected = torch.from_numpy(np.array(x)).double() @ torch.from_numpy(np.array(layer.weight)).double().T
    if bias:
        expected = expected + torch.from_numpy(np.array(layer.bias)).double()
    assert_parity(np.array(actual), expected.numpy(), FP32_RTOL, what="vs torch")


@needs_ext
def test_linear_repacks_replaced_weights_and_falls_back_for_other_inputs():
    layer = nn.Linear(16, 8)
    x = mx.random.normal((3, 16))
    first = np.array(NATIVE.linear(layer, x))
    layer.weight = layer.weight * 2  # MLX may compute this in the old weight's buffer
    assert_parity(np.array(NATIVE.linear(layer, x)), 2 * first - np.array(layer.bias), FP32_RTOL)
    for other in (x.astype(mx.float16), x[0]):
        assert np.allclose(np.array(NATIVE.linear(layer, other).astype(mx.float32)),
                           np.array(layer(other).astype(mx.float32)), rtol=1e-3, atol=1e-3)


@needs_ext
@pytest.mark.parametrize("with_silu", [False, True])
@pytest.mark.parametrize("shape,groups", [((2, 9, 7, 64), 32), ((1, 64, 64, 320), 32), ((2, 5, 3, 24), 4),
                                          ((1, 77, 1280), 32)])
def test_group_norm_matches_builtin_and_torch(shape, groups, with_silu):
    channels = shape[-1]
    norm = GroupNorm(groups, channels, eps=1e-6)
    norm.weight = 1 + 0.1 * mx.random.normal((channels,))
    norm.bias = 0.05 * mx.random.normal((channels,))
    x = mx.random.normal(shape) * 3 + 50  # |mean| ≫ std: catches a float32 one-pass variance
    actual = NATIVE.group_norm(norm, x, with_silu)
    assert _primitive(actual) == "SdxsGroupNorm"
    assert_parity(np.array(actual), np.array(PORTABLE.group_norm(norm, x, with_silu)), FP32_RTOL, what="vs built-in")
    xt = torch.from_numpy(np.array(x)).double().movedim(-1, 1)
    expected = F.group_norm(xt, groups, torch.from_numpy(np.array(norm.weight)).double(),
                            torch.from_numpy(np.array(norm.bias)).double(), eps=1e-6)
    expected = (F.silu(expected) if with_silu else expected).movedim(1, -1).numpy()
    assert_parity(np.array(actual), expected, FP32_RTOL, what="vs torch")


@needs_ext
def test_group_norm_leaves_its_input_intact():
    """It may write into a donated input buffer, never into one still in use."""
    norm = GroupNorm(4, 16)
    x = mx.random.normal((1, 8, 8, 16))
    kept = np.array(x)
    mx.eval(NATIVE.group_norm(norm, x, True))
    np.testing.assert_array_equal(np.array(x), kept)


@needs_ext
@pytest.mark.parametrize("shape", [(1, 300, 2 * 1280), (2, 7, 2 * 13), (5, 2 * 8)])
def test_geglu_matches_erf_gelu_on_the_projection_halves(shape):
    """value · GELU(gate) on `mx.split` views (how the UNet calls it) and on a transposed (gathered) view."""
    projected = mx.random.normal(shape) * 4
    value, gate = mx.split(projected, 2, axis=-1)
    actual = NATIVE.geglu(value, gate)
    assert _primitive(actual) == "SdxsGeglu"
    v, g = (torch.from_numpy(np.array(t)).double() for t in (value, gate))
    expected = (v * F.gelu(g)).numpy()
    assert np.abs(np.array(actual) - expected).max() < 6e-6 * max(1.0, np.abs(expected).max())
    assert_parity(np.array(actual), np.array(PORTABLE.geglu(value, gate)), FP32_RTOL, what="vs built-in")
    if value.ndim == 3:
        vt, gt = value.transpose(1, 0, 2), gate.transpose(1, 0, 2)
        assert_parity(np.array(NATIVE.geglu(vt, gt)), expected.transpose(1, 0, 2), FP32_RTOL, what="transposed")


def _heads(t: mx.array, heads: int) -> mx.array:
    """(B, tokens, heads·dim) → (B, heads, tokens, dim) as the UNet's attention splits heads (a strided view)."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(0, 2, 1, 3)


@needs_ext
@pytest.mark.parametrize("heads,tokens,keys,head_dim", [(10, 257, 257, 64), (5, 300, 77, 64), (1, 64, 64, 512),
                                                        (20, 64, 77, 64), (2, 1, 9, 8)])
@pytest.mark.parametrize("layout", ["contiguous", "head-split"])
def test_attention_matches_builtin_and_torch(heads, tokens, keys, head_dim, layout):
    mx.random.seed(heads + tokens)
    if layout == "contiguous":
        q = mx.random.normal((2, heads, tokens, head_dim)) * 4
        k, v = mx.random.normal((2, heads, keys, head_dim)) * 4, mx.random.normal((2, heads, keys, head_dim))
    else:
        q = _heads(mx.random.normal((2, tokens, heads * head_dim)) * 4, heads)
        k, v = (_heads(mx.random.normal((2, keys, heads * head_dim)) * s, heads) for s in (4, 1))
    scale = head_dim**-0.5
    actual = NATIVE.attention(q, k, v, scale)
    assert _primitive(actual) == "SdxsAttention" and actual.shape == q.shape
    assert_parity(np.array(actual), np.array(PORTABLE.attention(q, k, v, scale)), FP32_RTOL, what="vs mx.fast")
    expected = F.scaled_dot_product_attention(*(torch.from_numpy(np.array(t)).double() for t in (q, k, v)),
                                              scale=scale).numpy()
    assert_parity(np.array(actual), expected, FP32_RTOL, what="vs torch")
    # What the model does next: back to tokens-major (free, the result is laid out that way) and flatten.
    merged = actual.transpose(0, 2, 1, 3).reshape(2, tokens, -1)
    assert_parity(np.array(merged), expected.transpose(0, 2, 1, 3).reshape(2, tokens, -1), FP32_RTOL)


@needs_ext
def test_attention_of_a_sliced_view_matches():
    """Operands whose rows are not contiguous (a strided slice of head_dim) are copied first."""
    base = mx.random.normal((1, 2, 33, 128))
    q, k, v = base[..., ::2], base[..., 1::2] * 2, base[..., ::2] * 0.5
    expected = PORTABLE.attention(mx.contiguous(q), mx.contiguous(k), mx.contiguous(v), 0.125)
    assert_parity(np.array(NATIVE.attention(q, k, v, 0.125)), np.array(expected), FP32_RTOL)


@needs_ext
def test_other_dtypes_and_causal_attention_fall_back_to_the_pure_mlx_ops():
    conv = _conv(8, 16, 3, 1, 1, True, seed=0)
    x16 = mx.random.normal((1, 8, 8, 8)).astype(mx.float16)
    conv.set_dtype(mx.float16)
    assert NATIVE.conv2d(conv, x16).dtype == mx.float16
    np.testing.assert_array_equal(np.array(NATIVE.conv2d(conv, x16)), np.array(CPUOps().conv2d(conv, x16)))
    q, k, v = (mx.random.normal((1, 2, 9, 8)) for _ in range(3))
    np.testing.assert_array_equal(np.array(NATIVE.attention(q, k, v, 0.3, causal=True)),
                                  np.array(CPUOps().attention(q, k, v, 0.3, causal=True)))
    norm = GroupNorm(3, 16)  # 3 groups do not divide 16 channels: the built-in's error, not ours
    with pytest.raises(ValueError):
        mx.eval(NATIVE.group_norm(norm, mx.zeros((1, 2, 2, 16))))


@needs_ext
def test_the_cpu_policy_uses_the_native_kernels_and_portable_never():
    assert runtime.ops_for("cpu").name == "cpu-native"
    assert runtime.ops_for("portable") is PORTABLE
    assert native.status().startswith(f"built for mlx {mx.__version__}")


@needs_ext
@pytest.mark.parametrize("shape", [(1, 4096, 320), (2, 77, 1280), (3, 5)])
def test_linear_fuses_the_residual_add(shape):
    layer = nn.Linear(shape[-1], 24)
    x, residual = mx.random.normal(shape), mx.random.normal((*shape[:-1], 24))
    mx.eval(x, residual, layer.parameters())
    actual = NATIVE.linear(layer, x, residual)
    assert "SdxsConv2d" in _primitives(actual) and "Add" not in _primitives(actual)
    assert_parity(np.array(actual), np.array(layer(x) + residual), FP32_RTOL, what="vs nn.Linear + residual")


@needs_ext
@pytest.mark.parametrize("shape", [(1, 4096, 320), (2, 77, 1280), (7, 13), (1, 3, 5, 640)])
def test_layer_norm_matches_builtin_and_torch(shape):
    norm = nn.LayerNorm(shape[-1])
    norm.weight, norm.bias = mx.random.normal((shape[-1],)), mx.random.normal((shape[-1],))
    x = mx.random.normal(shape) * 30 + 100  # a large mean: the two-pass variance must not cancel
    actual = NATIVE.layer_norm(norm, x)
    assert "SdxsLayerNorm" in _primitives(actual)
    assert_parity(np.array(actual), np.array(norm(x)), FP32_RTOL, what="vs nn.LayerNorm")
    expected = F.layer_norm(torch.from_numpy(np.array(x)).double(), (shape[-1],),
                            torch.from_numpy(np.array(norm.weight)).double(),
                            torch.from_numpy(np.array(norm.bias)).double(), norm.eps)
    assert_parity(np.array(actual), expected.numpy(), FP32_RTOL, what="vs torch")
    assert "SdxsLayerNorm" not in _primitives(NATIVE.layer_norm(norm, x.astype(mx.float16)))


# --- the loader and the build, which need no built extension ----------------------------------------


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """`native` with no cached load and its build record at a scratch path."""
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_ops", None)
    monkeypatch.setattr(native, "BUILD_INFO", tmp_path / "build-info.json")
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)
    return tmp_path / "build-info.json"


def test_without_a_build_the_cpu_policy_keeps_the_pure_mlx_kernels(fresh_loader, capsys):
    fallback = CPUOps()
    assert native.cpu_ops(fallback) is fallback
    assert native.status().startswith("not built (build them with bash scripts/setup.sh")
    assert capsys.readouterr().err == ""  # not built is the normal state: nothing to warn about


def test_a_build_for_another_mlx_is_never_imported(fresh_loader, capsys, monkeypatch):
    fresh_loader.write_text(json.dumps({"mlx": "0.0.1"}))
    monkeypatch.setattr(native, "_import_extension", lambda: pytest.fail("imported a module built for another MLX"))
    fallback = CPUOps()
    assert native.cpu_ops(fallback) is fallback
    assert native.status() == (f"not built for mlx {mx.__version__} (built for mlx 0.0.1; rebuild with "
                               f"{native.BUILD_HINT})")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mlx-sdxs: native CPU kernels {native.status()}; using the pure-MLX CPU kernels"]


def test_a_module_that_does_not_import_falls_back_with_the_reason(fresh_loader, monkeypatch):
    fresh_loader.write_text(json.dumps({"mlx": mx.__version__}))

    def broken():
        raise ImportError("libdnnl.so.3: cannot open shared object file")

    monkeypatch.setattr(native, "_import_extension", broken)
    assert native.cpu_ops(CPUOps()).name == "cpu"
    assert "libdnnl.so.3: cannot open shared object file" in native.status()


def test_the_switch_turns_them_off(fresh_loader, monkeypatch):
    fresh_loader.write_text(json.dumps({"mlx": mx.__version__}))
    monkeypatch.setenv(native.NATIVE_ENV, "off")
    assert native.cpu_ops(CPUOps()).name == "cpu"
    assert native.status() == "off (MLX_SDXS_NATIVE=off)"


def test_a_failed_build_leaves_not_built(monkeypatch, tmp_path):
    record = tmp_path / "build-info.json"
    record.write_text(json.dumps({"mlx": mx.__version__}))  # from an earlier build
    monkeypatch.setattr(native_build, "BUILD_INFO", record)
    monkeypatch.setattr(native_build, "_compiler", lambda: None)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        native_build.build()
    assert not record.exists()
    assert native_build.main([]) == 1

"""The operations whose implementation depends on the kernel policy, and the portable set of them.

Every model routes its convolutions, linear layers, norms, activations and attention through an `Ops`
object held by the module (`module.ops`). `PortableOps` — the default — uses MLX built-ins only:
exactly what Metal and CUDA run. `mlx_sdxs.models.cpu_ops.CPUOps` swaps in CPU rewrites. Which set a
loaded model gets is decided once, outside the models, by `mlx_sdxs.runtime` (the kernel policy);
models never ask which device they run on.

float16 rules, kept by every implementation (the true result fits float16, so must every intermediate):
- attention scores are computed in float32 (q·kᵀ of two O(100) vectors already exceeds 65504): by MLX's
  fused attention kernel, which takes half precision and keeps its scores and softmax in float32, or,
  where no fused kernel takes the shape (the CPU, head sizes it lacks), by upcasting q, k and v;
- GroupNorm statistics are float32 (squares of O(300) activations overflow);
- GELU is `x · Φ(x)` with Φ computed first (diffusers' and MLX's `x·(1+erf)/2` doubles x first);
  GEGLU multiplies the value by GELU(gate), never value·gate first (300·(−300) → −inf, ·Φ = 0 → NaN).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, TypeVar

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

_SQRT_HALF = 1 / math.sqrt(2)
T = TypeVar("T")


@partial(mx.compile, shapeless=True)
def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, as torch's default; Φ(x) first, so no intermediate exceeds |x|."""
    return x * (0.5 + 0.5 * mx.erf(x * _SQRT_HALF))


@partial(mx.compile, shapeless=True)
def _geglu(value: mx.array, gate: mx.array) -> mx.array:
    return value * gelu(gate)


@partial(mx.compile, shapeless=True)
def _affine(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    return x * weight + bias


@partial(mx.compile, shapeless=True)
def _affine_silu(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    return nn.silu(x * weight + bias)


ACTIVATIONS = {None: None, "relu": nn.relu, "silu": nn.silu}


def upsample_nearest(x: mx.array, size: tuple[int, int]) -> mx.array:
    """Nearest-neighbour resize of NHWC `x` to `size` (torch `interpolate(mode="nearest")`); a broadcast,
    not a gather, for whole-number factors."""
    batch, height, width, channels = x.shape
    factor_y, factor_x = size[0] // height, size[1] // width
    if (factor_y * height, factor_x * width) == tuple(size):
        x = mx.broadcast_to(x[:, :, None, :, None, :], (batch, height, factor_y, width, factor_x, channels))
        return x.reshape(batch, size[0], size[1], channels)
    rows = (mx.arange(size[0]) * height) // size[0]
    cols = (mx.arange(size[1]) * width) // size[1]
    return x[:, rows][:, :, cols]


def epilogue(y: mx.array, conv, residual: mx.array | None, activation: str | None) -> mx.array:
    """The conv epilogue as separate built-in ops: + bias, + residual, then the activation."""
    if "bias" in conv:
        y = y + conv.bias
    if residual is not None:
        y = y + residual
    return y if activation is None else ACTIVATIONS[activation](y)


class PortableOps:
    """MLX built-ins only. The arithmetic every device runs; the CPU policy overrides some methods."""

    name = "portable"

    def conv2d(self, conv, x: mx.array, residual: mx.array | None = None, activation: str | None = None) -> mx.array:
        """activation(conv(x) + bias + residual); `conv` is a `layers.Conv2d` (weight OHWI, optional bias,
        stride, padding), activation None, "relu" or "silu"."""
        return epilogue(mx.conv2d(x, conv.weight, conv.stride, conv.padding), conv, residual, activation)

    def upsample_conv2d(self, conv, x: mx.array, size: tuple[int, int]) -> mx.array:
        """conv(x nearest-upsampled to `size`): the pair every decoder and UNet upsampler runs, one op so
        that a kernel set can compute it without the upsampled image."""
        return self.conv2d(conv, upsample_nearest(x, size))

    def linear(self, layer: nn.Linear, x: mx.array, residual: mx.array | None = None) -> mx.array:
        """x·Wᵀ + b (`layer` an `nn.Linear`), then + residual."""
        y = nn.Linear.__call__(layer, x)
        return y if residual is None else y + residual

    def layer_norm(self, norm: nn.LayerNorm, x: mx.array) -> mx.array:
        """LayerNorm over the last axis (`mx.fast.layer_norm` accumulates in float32 on every device)."""
        return nn.LayerNorm.__call__(norm, x)

    def group_norm(self, norm, x: mx.array, with_silu: bool = False) -> mx.array:
        """PyTorch-semantics GroupNorm over NHWC (`norm` is a `layers.GroupNorm`), optionally then SiLU.

        Groups are moved next to each other and normalised by `mx.fast.layer_norm`, which accumulates
        in float32 on every device (its fallback upcasts; the Metal/CUDA kernels sum in float)."""
        batch, channels = x.shape[0], x.shape[-1]
        groups = norm.num_groups
        per_group = channels // groups
        grouped = x.reshape(batch, -1, groups, per_group).transpose(0, 2, 1, 3).reshape(batch, groups, -1)
        normed = mx.fast.layer_norm(grouped, None, None, norm.eps)
        normed = normed.reshape(batch, groups, -1, per_group).transpose(0, 2, 1, 3).reshape(x.shape)
        weight, bias = norm.weight.astype(x.dtype), norm.bias.astype(x.dtype)  # no-ops when they match
        return (_affine_silu if with_silu else _affine)(normed, weight, bias)

    def silu(self, x: mx.array) -> mx.array:
        return nn.silu(x)

    def gelu(self, x: mx.array) -> mx.array:
        return gelu(x)

    def geglu(self, value: mx.array, gate: mx.array) -> mx.array:
        """value · GELU(gate) (diffusers' GEGLU), ordered so that float16 cannot overflow early."""
        return _geglu(value, gate)

    def attention(self, q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool = False) -> mx.array:
        """softmax(q·kᵀ·scale)·v over (B, heads, tokens, head_dim). Half precision goes to MLX's fused kernel
        as it is (scores and softmax in float32 inside: one kernel, no upcast copies); where none takes the
        shape, it is computed in float32."""
        mask = "causal" if causal else None
        if q.dtype not in (mx.float16, mx.bfloat16):
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        try:
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, force_fused=True)
        except ValueError:  # no fused kernel here: MLX's composition would compute q·kᵀ in half precision
            pass
        half = q.dtype
        q, k, v = (t.astype(mx.float32) for t in (q, k, v))
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask).astype(half)


PORTABLE = PortableOps()


def derived(layer: nn.Module, key: tuple, make: Callable[[], T]) -> T:
    """`make()`, an array (or layer) derived from `layer`'s parameters (a packed or fused weight), made once
    per key, evaluated at once (inside `mx.compile` it is then a constant, not a step of every call) and kept
    on the layer; dropped whenever one of its parameters is replaced (e.g. by `load_weights`). The arrays'
    buffers cannot tell: MLX lets a later op reuse a buffer in place, so identity is what counts."""
    parameters = tuple(value for _, value in tree_flatten(layer.parameters()))
    cached = getattr(layer, "_derived", None)
    if cached is None or len(cached[0]) != len(parameters) or any(a is not b for a, b in zip(cached[0], parameters)):
        cached = (parameters, {})
        object.__setattr__(layer, "_derived", cached)
    if key not in cached[1]:
        made = make()
        mx.eval(made.parameters() if isinstance(made, nn.Module) else made)
        cached[1][key] = made
    return cached[1][key]


class UsesOps:
    """Mixin for modules whose arithmetic goes through `self.ops` (portable until a policy is applied)."""

    ops: PortableOps = PORTABLE


def set_ops(model: nn.Module, ops: PortableOps) -> None:
    """Give every op-using module of `model` (itself included) the implementation set `ops`."""
    for _, module in model.named_modules():
        if isinstance(module, UsesOps):
            module.ops = ops

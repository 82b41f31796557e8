"""Layers shared by the models: `nn.Conv2d`/`nn.GroupNorm` drop-ins whose arithmetic goes through the
kernel policy's ops (`mlx_sdxs.models.ops`), and the resnet / up- / downsample blocks diffusers' UNet
and VAEs have in common. Parameters mirror `mlx.nn`'s, so checkpoints load unchanged.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from mlx_sdxs.models.ops import UsesOps


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class Conv2d(UsesOps, nn.Module):
    """`nn.Conv2d` (groups = dilation = 1): weight (O, kh, kw, I), bias (O,); computed by `self.ops`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0, bias: bool = True):
        super().__init__()
        kernel_size = _pair(kernel_size)
        scale = math.sqrt(1 / (in_channels * kernel_size[0] * kernel_size[1]))
        self.weight = mx.random.uniform(low=-scale, high=scale, shape=(out_channels, *kernel_size, in_channels))
        if bias:
            self.bias = mx.zeros((out_channels,))
        self.stride = _pair(stride)
        self.padding = _pair(padding)

    def __call__(self, x: mx.array, residual: mx.array | None = None, activation: str | None = None) -> mx.array:
        """activation(conv(x) + bias + residual): the epilogue is the ops' to fuse (activation: None,
        "relu" or "silu")."""
        return self.ops.conv2d(self, x, residual=residual, activation=activation)

    def upsampled(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        """conv(x nearest-upsampled to `size`), computed by the ops as one step."""
        return self.ops.upsample_conv2d(self, x, size)


class Linear(UsesOps, nn.Linear):
    """`nn.Linear` computed by `self.ops`, with the residual add after it for the ops to fuse."""

    def __call__(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        return self.ops.linear(self, x, residual)


class LayerNorm(UsesOps, nn.LayerNorm):
    """`nn.LayerNorm` computed by `self.ops`."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.ops.layer_norm(self, x)


class GroupNorm(UsesOps, nn.Module):
    """PyTorch-semantics GroupNorm over NHWC (`nn.GroupNorm(..., pytorch_compatible=True)` parameters),
    statistics in float32; `with_silu` applies SiLU in the same pass where the ops can."""

    def __init__(self, num_groups: int, dims: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array, with_silu: bool = False) -> mx.array:
        return self.ops.group_norm(self, x, with_silu)


# ------------------------------------------------------------------ building blocks shared by the models


class Placeholder(nn.Module):
    """A parameter-less slot in a module list, so list indices match the checkpoint's (diffusers' Dropout,
    activation and upsample entries); applies `fn`, the identity by default."""

    def __init__(self, fn=None):
        super().__init__()
        self._fn = fn

    def __call__(self, x: mx.array) -> mx.array:
        return x if self._fn is None else self._fn(x)


class ResnetBlock2D(nn.Module):
    """diffusers' `ResnetBlock2D`: norm-silu-conv twice with a skip (1×1-projected when channels change);
    the UNet's adds the projected time embedding after the first conv."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float,
                 temb_channels: int | None = None, output_scale: float = 1.0):
        super().__init__()
        self.output_scale = output_scale
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def time_shift(self, temb_act: mx.array) -> mx.array:
        """The (batch, channels) vector this block adds after `conv1`: its projection of silu(time embedding).
        It depends on the timestep only, so a UNet computes it once per timestep, not once per frame."""
        return self.time_emb_proj(temb_act)

    def __call__(self, x: mx.array, time_shift: mx.array | None = None) -> mx.array:
        h = self.conv1(self.norm1(x, with_silu=True))
        if time_shift is not None:
            h = h + time_shift[:, None, None, :]
        skip = self.conv_shortcut(x) if "conv_shortcut" in self else x
        if self.output_scale != 1.0:  # scale each term first: their sum may exceed float16, the result not
            h = self.conv2(self.norm2(h, with_silu=True))
            return skip / self.output_scale + h / self.output_scale
        return self.conv2(self.norm2(h, with_silu=True), residual=skip)


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv; with `padding=0` diffusers pads right/bottom only (the VAE's variant)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def __call__(self, x: mx.array) -> mx.array:
        if self.padding == 0:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest upsampling (to `size`, default 2×) then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
        return self.conv.upsampled(x, size or (2 * x.shape[1], 2 * x.shape[2]))

"""The conditional UNet of SD-1/2, SD-Turbo and SDXS-512, in MLX (NHWC).

Follows diffusers 0.42.1 `UNet2DConditionModel` with the block types these checkpoints use
(CrossAttn/plain down and up blocks, optional `UNetMidBlock2DCrossAttn`). Parameter names equal the
diffusers state-dict keys, so conversion only transposes convolutions. Every per-level option of the
diffusers config is resolved once, in `UNetConfig.from_dict`, into per-level `LevelConfig`s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_sdxs.errors import ConfigError
from mlx_sdxs.models.layers import (
    Conv2d,
    Downsample2D,
    GroupNorm,
    LayerNorm,
    Linear,
    Placeholder,
    ResnetBlock2D,
    Upsample2D,
)
from mlx_sdxs.models.ops import UsesOps, derived

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# Options that change the math away from the SD-1/2 UNet; any other value is refused, not ignored.
_REQUIRED_VALUES: dict[str, Any] = {
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "attention_type": ("default",),
    "dual_cross_attention": (False,),
    "resnet_skip_time_act": (False,),
    "class_embeddings_concat": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "cross_attention_norm": (None,),
    "num_attention_heads": (None,),  # diffusers itself refuses it (issue #2011)
    "reverse_transformer_layers_per_block": (None,),
}


@dataclass(frozen=True)
class LevelConfig:
    """One resolution level of the down or up path, with the diffusers quirks already resolved."""

    block_type: str
    channels: int
    num_layers: int  # resnets in the block (up blocks: layers_per_block + 1)
    transformer_layers: int
    num_heads: int  # diffusers' `attention_head_dim` (it is the number of heads, see issue #2011)
    cross_attention_dim: int
    only_cross_attention: bool

    @property
    def has_attention(self) -> bool:
        return self.block_type.startswith("CrossAttn")


@dataclass(frozen=True)
class UNetConfig:
    """What the MLX UNet needs, resolved from a diffusers config by `from_dict`."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_levels: tuple[LevelConfig, ...]
    up_levels: tuple[LevelConfig, ...]  # in execution order: lowest resolution first
    has_mid_block: bool
    norm_num_groups: int
    norm_eps: float
    flip_sin_to_cos: bool
    freq_shift: float
    time_embedding_dim: int
    center_input_sample: bool
    downsample_padding: int
    mid_block_scale_factor: float
    upcast_attention: bool
    conv_in_kernel: int
    conv_out_kernel: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Read a diffusers `unet/config.json` dict; unknown keys are ignored, unsupported values refused."""
        for field, allowed in _REQUIRED_VALUES.items():
            value = d.get(field, allowed[0])
            if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
                raise ConfigError(f"unet config: {field}={value!r} is not supported (supported: {list(allowed)})")

        down_types = _str_list(d, "down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], DOWN_BLOCK_TYPES)
        up_types = _str_list(d, "up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, UP_BLOCK_TYPES)
        n = len(down_types)
        if len(up_types) != n:
            raise ConfigError(f"unet config: up_block_types has {len(up_types)} entries, down_block_types {n}")
        mid_block_type = d.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid_block_type not in MID_BLOCK_TYPES:
            raise ConfigError(
                f"unet config: mid_block_type={mid_block_type!r} is not supported (supported: {list(MID_BLOCK_TYPES)})"
            )

        channels = _per_level(d, "block_out_channels", (320, 640, 1280, 1280), n, int, list_only=True)
        layers = _per_level(d, "layers_per_block", 2, n, int)
        transformer_layers = _per_level(d, "transformer_layers_per_block", 1, n, int)
        heads = _per_level(d, "attention_head_dim", 8, n, int)
        cross_dims = _per_level(d, "cross_attention_dim", 1280, n, int)
        only_cross = _per_level(d, "only_cross_attention", False, n, bool)
        groups = _scalar(d, "norm_num_groups", 32, int)
        _scalar(d, "use_linear_projection", False, bool)  # validated only: both layouts load into Linear
        for c in channels:
            if c % groups:
                raise ConfigError(f"unet config: norm_num_groups={groups} does not divide block_out_channels={c}")
        for i in range(n):
            if heads[i] > channels[i]:
                raise ConfigError(f"unet config: attention_head_dim={heads[i]} (heads) exceeds {channels[i]} channels")

        def level(block_type: str, i: int, num_layers: int) -> LevelConfig:
            return LevelConfig(
                block_type, channels[i], num_layers, transformer_layers[i], heads[i], cross_dims[i], only_cross[i]
            )

        # Up blocks mirror the down path: per-level lists are read reversed, with one extra resnet each.
        return cls(
            in_channels=_scalar(d, "in_channels", 4, int),
            out_channels=_scalar(d, "out_channels", 4, int),
            block_out_channels=channels,
            down_levels=tuple(level(t, i, layers[i]) for i, t in enumerate(down_types)),
            up_levels=tuple(level(t, n - 1 - i, layers[n - 1 - i] + 1) for i, t in enumerate(up_types)),
            has_mid_block=mid_block_type is not None,
            norm_num_groups=groups,
            norm_eps=_scalar(d, "norm_eps", 1e-5, float),
            flip_sin_to_cos=_scalar(d, "flip_sin_to_cos", True, bool),
            freq_shift=_scalar(d, "freq_shift", 0, float),
            time_embedding_dim=_scalar(d, "time_embedding_dim", None, int) or 4 * channels[0],
            center_input_sample=_scalar(d, "center_input_sample", False, bool),
            downsample_padding=_scalar(d, "downsample_padding", 1, int, allowed=(0, 1)),
            mid_block_scale_factor=_scalar(d, "mid_block_scale_factor", 1.0, float),
            upcast_attention=_scalar(d, "upcast_attention", False, bool),
            conv_in_kernel=_scalar(d, "conv_in_kernel", 3, int, allowed=(1, 3, 5, 7)),
            conv_out_kernel=_scalar(d, "conv_out_kernel", 3, int, allowed=(1, 3, 5, 7)),
        )


def _is(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _scalar(d: dict, field: str, default: Any, kind: type, allowed: tuple | None = None) -> Any:
    value = d.get(field, default)
    if value is None and default is None:
        return None
    valid = _is(value, kind) if allowed is None else not isinstance(value, bool) and value in allowed
    if not valid:
        expected = f"one of {list(allowed)}" if allowed else f"a {'positive int' if kind is int else kind.__name__}"
        raise ConfigError(f"unet config: {field}={value!r} is invalid (expected {expected})")
    return kind(value)


def _per_level(d: dict, field: str, default: Any, n: int, kind: type, list_only: bool = False) -> tuple:
    """A scalar (repeated on every level) or a list with one entry per down block."""
    value = d.get(field, default)
    values = value if isinstance(value, (list, tuple)) else None if list_only else [value] * n
    if values is None or len(values) != n or not all(_is(v, kind) for v in values):
        what = "a list" if list_only else f"a {kind.__name__} or a list"
        raise ConfigError(f"unet config: {field}={value!r} is invalid (expected {what} of {n} {kind.__name__} values)")
    return tuple(kind(v) for v in values)


def _str_list(d: dict, field: str, default: list[str], allowed: tuple[str, ...]) -> list[str]:
    value = d.get(field, default)
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"unet config: {field}={value!r} is invalid (expected a non-empty list)")
    for item in value:
        if item not in allowed:
            raise ConfigError(f"unet config: {field} contains {item!r}, not supported (supported: {list(allowed)})")
    return list(value)


# ---------------------------------------------------------------------------------------------- layers


def _resnet_args(config: "UNetConfig") -> tuple[int, float, int]:
    """The UNet-wide arguments of every resnet: norm groups, norm eps, time-embedding width."""
    return config.norm_num_groups, config.norm_eps, config.time_embedding_dim


@dataclass
class Conditioning:
    """What a UNet forward needs besides the sample, computed apart because it changes less often:
    `time`, per resnet, the vector it adds after its first conv (per timestep: once per stream); `text`,
    per cross-attention, its keys and values of the text embeddings (per prompt: once per prompt change)."""

    time: list[mx.array]
    text: list[tuple[mx.array, mx.array]]


class Attention(UsesOps, nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, context_dim: int, upcast: bool):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.scale = head_dim**-0.5
        self.upcast = upcast
        self.to_q = Linear(dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = [Linear(inner, dim), Placeholder()]
        #: Where its keys and values sit in `Conditioning.text`, for a cross-attention (set by the UNet).
        self.text_index: int | None = None

    def _heads(self, t: mx.array) -> mx.array:
        """(B, tokens, heads·head_dim) → (B, heads, tokens, head_dim), a view."""
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, -1).transpose(0, 2, 1, 3)

    def context_kv(self, context: mx.array) -> tuple[mx.array, mx.array]:
        """Keys and values of `context` in heads layout: for a cross-attention, once per prompt."""
        return self._heads(self.to_k(context)), self._heads(self.to_v(context))

    def _fused_qkv(self) -> Linear:
        """to_q, to_k and to_v as one layer (one matmul instead of three), made once from their weights."""
        def make() -> Linear:
            layer = Linear(self.to_q.weight.shape[1], 3 * self.to_q.weight.shape[0], bias=False)
            layer.weight = mx.concatenate([self.to_q.weight, self.to_k.weight, self.to_v.weight])
            layer.ops = self.ops
            return layer
        return derived(self, ("qkv", self.ops.name), make)

    def __call__(self, x: mx.array, kv: tuple[mx.array, mx.array] | None = None,
                 residual: mx.array | None = None) -> mx.array:
        """Self-attention of `x`, or attention of `x` over the keys and values `kv` (see `context_kv`), plus
        `residual` (added in the output projection's epilogue)."""
        batch, length, _ = x.shape
        if kv is None:  # (B, L, 3·heads·head_dim) → three (B, heads, L, head_dim) views, no copies
            qkv = self._fused_qkv()(x).reshape(batch, length, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
            q, k, v = (t.squeeze(0) for t in mx.split(qkv, 3))
        else:
            q, (k, v) = self._heads(self.to_q(x)), kv
        if self.upcast:
            q, k, v = q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32)
        out = self.ops.attention(q, k, v, self.scale).astype(x.dtype)
        return self.to_out[0](out.transpose(0, 2, 1, 3).reshape(batch, length, -1), residual)


class GEGLU(UsesOps, nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, 2 * inner)

    def __call__(self, x: mx.array) -> mx.array:
        value, gate = mx.split(self.proj(x), 2, axis=-1)
        return self.ops.geglu(value, gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = [GEGLU(dim, 4 * dim), Placeholder(), Linear(4 * dim, dim)]

    def __call__(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        return self.net[2](self.net[0](x), residual)


class BasicTransformerBlock(nn.Module):
    """Self- (or, with only_cross_attention, a second cross-) attention, cross-attention, GEGLU MLP."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, context_dim: int, only_cross: bool, upcast: bool):
        super().__init__()
        self.only_cross = only_cross
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, head_dim, context_dim if only_cross else dim, upcast)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, num_heads, head_dim, context_dim, upcast)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def cross_attentions(self) -> list[Attention]:
        return [self.attn1, self.attn2] if self.only_cross else [self.attn2]

    def __call__(self, x: mx.array, cond: Conditioning) -> mx.array:
        kv1 = cond.text[self.attn1.text_index] if self.only_cross else None
        x = self.attn1(self.norm1(x), kv1, residual=x)
        x = self.attn2(self.norm2(x), cond.text[self.attn2.text_index], residual=x)
        return self.ff(self.norm3(x), residual=x)


class Transformer2DModel(nn.Module):
    """Spatial transformer. diffusers' 1×1-conv projections (use_linear_projection=False) are the same
    map as Linear on NHWC, so both checkpoint variants load into Linear (a matmul, faster than conv)."""

    def __init__(self, level: LevelConfig, config: UNetConfig):
        super().__init__()
        channels, heads = level.channels, level.num_heads
        head_dim = channels // heads
        inner = heads * head_dim  # < channels when heads do not divide them, as in diffusers
        self.norm = GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        self.proj_in = Linear(channels, inner)
        self.transformer_blocks = [
            BasicTransformerBlock(
                inner, heads, head_dim, level.cross_attention_dim, level.only_cross_attention, config.upcast_attention
            )
            for _ in range(level.transformer_layers)
        ]
        self.proj_out = Linear(inner, channels)

    def __call__(self, x: mx.array, cond: Conditioning) -> mx.array:
        batch, height, width, channels = x.shape
        h = self.proj_in(self.norm(x).reshape(batch, height * width, channels))
        for block in self.transformer_blocks:
            h = block(h, cond)
        return self.proj_out(h, residual=x.reshape(batch, height * width, channels)).reshape(x.shape)


def _run_resnet(resnet: ResnetBlock2D, x: mx.array, cond: Conditioning) -> mx.array:
    return resnet(x, cond.time[resnet.time_index])


class DownBlock(nn.Module):
    """DownBlock2D, or CrossAttnDownBlock2D when the level has attention."""

    def __init__(self, in_channels: int, level: LevelConfig, config: UNetConfig, add_downsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else level.channels, level.channels, *_resnet_args(config))
            for i in range(level.num_layers)
        ]
        if level.has_attention:
            self.attentions = [Transformer2DModel(level, config) for _ in range(level.num_layers)]
        if add_downsample:
            self.downsamplers = [Downsample2D(level.channels, config.downsample_padding)]

    def __call__(self, x: mx.array, cond: Conditioning) -> tuple[mx.array, list[mx.array]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = _run_resnet(resnet, x, cond)
            if "attentions" in self:
                x = self.attentions[i](x, cond)
            skips.append(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """UpBlock2D, or CrossAttnUpBlock2D when the level has attention; each resnet eats one skip."""

    def __init__(
        self, prev_channels: int, skip_channels: list[int], level: LevelConfig, config: UNetConfig, add_upsample: bool
    ):
        super().__init__()
        self.resnets = [
            ResnetBlock2D((prev_channels if i == 0 else level.channels) + skip, level.channels, *_resnet_args(config))
            for i, skip in enumerate(skip_channels)
        ]
        if level.has_attention:
            self.attentions = [Transformer2DModel(level, config) for _ in range(level.num_layers)]
        if add_upsample:
            self.upsamplers = [Upsample2D(level.channels)]

    def __call__(self, x: mx.array, skips: list[mx.array], cond: Conditioning, size: tuple[int, int] | None) -> mx.array:
        for i, resnet in enumerate(self.resnets):
            x = _run_resnet(resnet, mx.concatenate([x, skips.pop()], axis=-1), cond)
            if "attentions" in self:
                x = self.attentions[i](x, cond)
        if "upsamplers" in self:
            x = self.upsamplers[0](x, size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, level: LevelConfig, config: UNetConfig):
        super().__init__()
        c = level.channels
        self.resnets = [ResnetBlock2D(c, c, *_resnet_args(config), config.mid_block_scale_factor) for _ in range(2)]
        # diffusers' mid block never takes only_cross_attention from the UNet config.
        self.attentions = [Transformer2DModel(replace(level, only_cross_attention=False), config)]

    def __call__(self, x: mx.array, cond: Conditioning) -> mx.array:
        x = _run_resnet(self.resnets[0], x, cond)
        return _run_resnet(self.resnets[1], self.attentions[0](x, cond), cond)


class TimestepEmbedding(UsesOps, nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(self.ops.silu(self.linear_1(x)))


# ---------------------------------------------------------------------------------------------- model


class ConditionedNetwork(UsesOps, nn.Module):
    """What the UNet and a ControlNet share: diffusers' time embedding, `conv_in`, the down path, an optional
    mid block, and their conditioning — computed apart from the frame (`time_conditioning` per timestep,
    `text_conditioning` per prompt). Subclasses build the rest, then call `_index_conditioning`."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c0 = config.block_out_channels[0]
        half = c0 // 2
        # Sinusoid frequencies exactly as diffusers' get_timestep_embedding (fp32); not a parameter.
        exponent = -math.log(10000.0) * mx.arange(half, dtype=mx.float32) / (half - config.freq_shift)
        self._frequencies = mx.exp(exponent)
        mx.eval(self._frequencies)  # a lazy graph would be bound to this thread's stream (camera loop: other thread)

        self.conv_in = Conv2d(config.in_channels, c0, config.conv_in_kernel, padding=config.conv_in_kernel // 2)
        self.time_embedding = TimestepEmbedding(c0, config.time_embedding_dim)

        n = len(config.down_levels)
        self.down_blocks = []
        prev = c0
        for i, level in enumerate(config.down_levels):
            self.down_blocks.append(DownBlock(prev, level, config, add_downsample=i < n - 1))
            prev = level.channels
        if config.has_mid_block:
            self.mid_block = UNetMidBlock2DCrossAttn(config.down_levels[-1], config)

    def _index_conditioning(self) -> None:
        """Tell every resnet and cross-attention where its terms sit in a `Conditioning`."""
        for i, resnet in enumerate(self._resnets()):
            resnet.time_index = i
        for i, attention in enumerate(self._cross_attentions()):
            attention.text_index = i

    def skip_channels(self) -> list[int]:
        """Channels of every skip the down path keeps, in order (conv_in's first)."""
        channels = [self.config.block_out_channels[0]]
        for block, level in zip(self.down_blocks, self.config.down_levels):
            channels += [level.channels] * (len(block.resnets) + ("downsamplers" in block))
        return channels

    def _blocks(self) -> list[nn.Module]:
        return [*self.down_blocks, *([self.mid_block] if "mid_block" in self else [])]

    def _resnets(self) -> list[ResnetBlock2D]:
        return [resnet for block in self._blocks() for resnet in block.resnets]

    def _cross_attentions(self) -> list[Attention]:
        return [attention for block in self._blocks() for transformer in getattr(block, "attentions", [])
                for layer in transformer.transformer_blocks for attention in layer.cross_attentions()]

    def _timestep_features(self, timestep: float | mx.array, batch: int) -> mx.array:
        t = mx.broadcast_to(mx.array(timestep).astype(mx.float32).reshape(-1), (batch,))
        angles = t[:, None] * self._frequencies[None, :]
        sin, cos = mx.sin(angles), mx.cos(angles)
        features = [cos, sin] if self.config.flip_sin_to_cos else [sin, cos]
        if self.config.block_out_channels[0] % 2:
            features.append(mx.zeros((batch, 1)))
        return mx.concatenate(features, axis=-1)

    def time_conditioning(self, timestep: float | mx.array, batch: int = 1) -> list[mx.array]:
        """`Conditioning.time`: every resnet's projection of the time embedding, in `self.dtype`."""
        dtype = self.conv_in.weight.dtype
        temb = self.time_embedding(self._timestep_features(timestep, batch).astype(dtype))
        temb_act = self.ops.silu(temb)
        return [resnet.time_shift(temb_act) for resnet in self._resnets()]

    def text_conditioning(self, encoder_hidden_states: mx.array) -> list[tuple[mx.array, mx.array]]:
        """`Conditioning.text`: every cross-attention's keys and values of the text embeddings (B, L, D)."""
        context = encoder_hidden_states.astype(self.conv_in.weight.dtype)
        return [attention.context_kv(context) for attention in self._cross_attentions()]

    def conditioning(self, timestep: float | mx.array, encoder_hidden_states: mx.array) -> Conditioning:
        return Conditioning(self.time_conditioning(timestep, encoder_hidden_states.shape[0]),
                            self.text_conditioning(encoder_hidden_states))

    def _down(self, x: mx.array, cond: Conditioning) -> tuple[mx.array, list[mx.array]]:
        """The down path from conv_in's output: (its output, every skip in order)."""
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, cond)
            skips += block_skips
        return x, skips


class UNet2DConditionModel(ConditionedNetwork):
    """ε-prediction UNet: `(sample NHWC, timestep, encoder_hidden_states) → noise NHWC`; with a ControlNet's
    residuals added to its skips and to the bottom of its down path (as diffusers does, mid block or not)."""

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        n = len(config.down_levels)
        skip_channels = self.skip_channels()
        prev = config.block_out_channels[-1]
        self.up_blocks = []
        for i, level in enumerate(config.up_levels):
            taken = [skip_channels.pop() for _ in range(level.num_layers)]
            self.up_blocks.append(UpBlock(prev, taken, level, config, add_upsample=i < n - 1))
            prev = level.channels

        c0 = config.block_out_channels[0]
        self.conv_norm_out = GroupNorm(config.norm_num_groups, c0, config.norm_eps)
        self.conv_out = Conv2d(c0, config.out_channels, config.conv_out_kernel, padding=config.conv_out_kernel // 2)
        self._index_conditioning()

    def _blocks(self) -> list[nn.Module]:
        return [*super()._blocks(), *self.up_blocks]

    def __call__(self, sample: mx.array, timestep: float | mx.array, encoder_hidden_states: mx.array,
                 residuals: tuple[list[mx.array], mx.array] | None = None) -> mx.array:
        """`sample` (B, H, W, C); `timestep` a number, shape () or (B,); `encoder_hidden_states` (B, L, D);
        `residuals` a ControlNet's (down, mid)."""
        return self.predict(sample, self.conditioning(timestep, encoder_hidden_states), residuals)

    def predict(self, sample: mx.array, cond: Conditioning,
                residuals: tuple[list[mx.array], mx.array] | None = None) -> mx.array:
        """ε for `sample` (B, H, W, C) under `cond` (see `conditioning`): the per-frame part of the UNet."""
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        x, skips = self._down(self.conv_in(sample), cond)
        if residuals is not None:
            down, mid = residuals
            skips = [skip + residual for skip, residual in zip(skips, down, strict=True)]
        if "mid_block" in self:
            x = self.mid_block(x, cond)
        if residuals is not None:
            x = x + mid

        for block in self.up_blocks:
            taken = skips[-len(block.resnets) :]
            del skips[-len(block.resnets) :]
            # upsample to the next skip's size: equals 2× except for odd sizes on the way down
            size = tuple(skips[-1].shape[1:3]) if skips else None
            x = block(x, taken, cond, size)

        return self.conv_out(self.conv_norm_out(x, with_silu=True))

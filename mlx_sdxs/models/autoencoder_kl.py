"""The KL autoencoder of Stable Diffusion (diffusers `AutoencoderKL`), in MLX with NHWC activations.

Follows diffusers 0.42.1 `AutoencoderKL`, `Encoder`/`Decoder` (vae.py), `DownEncoderBlock2D`,
`UpDecoderBlock2D`, `UNetMidBlock2D`, `ResnetBlock2D` (no time embedding) and the single-head
mid-block `Attention`. Parameter names mirror the checkpoint keys; legacy attention names
(`query/key/value/proj_attn`) are renamed at conversion by `mlx_sdxs.weights.map_key`.

`encode` returns the posterior mean (deterministic, unscaled); `decode` takes unscaled latents.
The pipeline applies `config.scaling_factor` / `config.shift_factor`, as diffusers pipelines do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_sdxs.errors import ConfigError
from mlx_sdxs.models.layers import Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D
from mlx_sdxs.models.ops import UsesOps

_EPS = 1e-6  # diffusers hard-codes this for every VAE norm


@dataclass(frozen=True)
class KLVAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "KLVAEConfig":
        """Known keys of a diffusers `AutoencoderKL` config.json; unknown keys are ignored."""
        fields = {k: config[k] for k in cls.__dataclass_fields__ if config.get(k) is not None}
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            if name in fields:
                fields[name] = tuple(fields[name])
        made = cls(**fields)
        if made.act_fn not in ("silu", "swish"):
            raise ConfigError(f"vae act_fn: {made.act_fn!r} is not supported by AutoencoderKL (only 'silu')")
        for name, supported in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(made, name)
            if len(types) != len(made.block_out_channels):
                raise ConfigError(f"vae {name}: {len(types)} entries but block_out_channels has {len(made.block_out_channels)}")
            if any(t != supported for t in types):
                bad = next(t for t in types if t != supported)
                raise ConfigError(f"vae {name}: {bad!r} is not supported (only {supported!r})")
        if any(c % made.norm_num_groups for c in made.block_out_channels):
            raise ConfigError(
                f"vae norm_num_groups: {made.norm_num_groups} does not divide block_out_channels {made.block_out_channels}"
            )
        if made.shift_factor is not None and not isinstance(made.shift_factor, (int, float)):
            raise ConfigError(f"vae shift_factor: {made.shift_factor!r} must be null or a number")
        if config.get("latents_mean") is not None or config.get("latents_std") is not None:
            raise ConfigError("vae latents_mean/latents_std: per-channel latent statistics are not supported")
        return made


def group_norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(groups, channels, eps=_EPS)


class Attention(UsesOps, nn.Module):
    """Single-head self-attention over all pixels, with group norm and a residual (the VAE mid block's)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, 1, h * w, c)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        out = self.ops.attention(q, k, v, c**-0.5)
        return x + self.to_out[0](out).reshape(b, h, w, c)


class MidBlock(nn.Module):
    """`UNetMidBlock2D` with one layer: resnet, attention (optional), resnet."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, groups, _EPS) for _ in range(2)]
        self.attentions = [Attention(channels, groups)] if add_attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        for block in self.attentions:
            x = block(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, _EPS) for i in range(num_layers)
        ]
        self.downsamplers = [Downsample2D(out_channels, padding=0)] if add_downsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, _EPS) for i in range(num_layers)
        ]
        self.upsamplers = [Upsample2D(out_channels)] if add_upsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: KLVAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups,
                               add_downsample=i != len(channels) - 1)
            for i in range(len(channels))
        ]
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = group_norm(channels[-1], groups)
        # Mean and log-variance, stacked on channels.
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, kernel_size=3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, with_silu=True))


class Decoder(nn.Module):
    def __init__(self, config: KLVAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = Conv2d(config.latent_channels, channels[0], kernel_size=3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, config.mid_block_add_attention)
        # diffusers gives every up block one resnet more than layers_per_block.
        self.up_blocks = [
            UpDecoderBlock2D(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups,
                             add_upsample=i != len(channels) - 1)
            for i in range(len(channels))
        ]
        self.conv_norm_out = group_norm(channels[-1], groups)
        self.conv_out = Conv2d(channels[-1], config.out_channels, kernel_size=3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, with_silu=True))


class AutoencoderKL(nn.Module):
    """KL VAE. `encode(image in [-1, 1]) -> posterior mean`, `decode(latents) -> image in [-1, 1]` (NHWC)."""

    def __init__(self, config: KLVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = Conv2d(2 * latent, 2 * latent, kernel_size=1)
        if config.use_post_quant_conv:
            self.post_quant_conv = Conv2d(latent, latent, kernel_size=1)

    def encode(self, image: mx.array) -> mx.array:
        """NHWC image in [-1, 1] → the unscaled posterior mean (diffusers' `latent_dist.mean`)."""
        moments = self.encoder(image)
        if "quant_conv" in self:
            moments = self.quant_conv(moments)
        return moments[..., : self.config.latent_channels]

    def decode(self, latents: mx.array) -> mx.array:
        """Unscaled NHWC latents → NHWC image, nominally in [-1, 1] (not clamped)."""
        if "post_quant_conv" in self:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def __call__(self, image: mx.array) -> mx.array:
        return self.decode(self.encode(image))

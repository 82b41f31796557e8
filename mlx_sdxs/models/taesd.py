"""TAESD, the tiny distilled VAE (diffusers `AutoencoderTiny`), in MLX with NHWC activations.

Follows diffusers 0.42.1 `AutoencoderTiny` / `EncoderTiny` / `DecoderTiny` / `AutoencoderTinyBlock`:
parameter names mirror its checkpoint keys (`encoder.layers.N…`, `decoder.layers.N.conv.M…`), and the
parameter-less members of its `nn.Sequential`s (activations, upsampling) are kept as placeholders so
that the indices line up.

Ranges, as diffusers defines them: `encode` takes an image in [-1, 1] and returns raw latents;
`decode` takes raw latents and returns an image in [-1, 1] (not clamped). The pipeline multiplies
and divides by `config.scaling_factor` (1.0 for TAESD), as diffusers pipelines do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_sdxs.errors import ConfigError
from mlx_sdxs.models.layers import Conv2d, Placeholder
from mlx_sdxs.models.ops import upsample_nearest


@dataclass(frozen=True)
class TinyVAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    act_fn: str = "relu"
    upsample_fn: str = "nearest"
    latent_channels: int = 4
    upsampling_scaling_factor: int = 2
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    force_upcast: bool = False

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "TinyVAEConfig":
        """Known keys of a diffusers `AutoencoderTiny` config.json; unknown keys are ignored."""
        fields = {k: config[k] for k in cls.__dataclass_fields__ if config.get(k) is not None}
        for name in ("encoder_block_out_channels", "decoder_block_out_channels", "num_encoder_blocks", "num_decoder_blocks"):
            if name in fields:
                fields[name] = tuple(fields[name])
        made = cls(**fields)
        if made.act_fn != "relu":
            raise ConfigError(f"vae act_fn: {made.act_fn!r} is not supported by AutoencoderTiny (only 'relu')")
        if made.upsample_fn != "nearest":
            raise ConfigError(f"vae upsample_fn: {made.upsample_fn!r} is not supported (only 'nearest')")
        if not isinstance(made.upsampling_scaling_factor, int) or made.upsampling_scaling_factor < 1:
            raise ConfigError(
                f"vae upsampling_scaling_factor: {made.upsampling_scaling_factor!r} must be a positive integer"
            )
        for channels, blocks in (("encoder_block_out_channels", "num_encoder_blocks"),
                                 ("decoder_block_out_channels", "num_decoder_blocks")):
            if len(getattr(made, channels)) != len(getattr(made, blocks)) or not getattr(made, blocks):
                raise ConfigError(f"vae {channels}: must be non-empty and as long as {blocks}")
            # diffusers chains the stages without projections, so a width change cannot run there either.
            if len(set(getattr(made, channels))) != 1:
                raise ConfigError(f"vae {channels}: {list(getattr(made, channels))} must all be equal")
        return made


class TinyBlock(nn.Module):
    """`AutoencoderTinyBlock`: relu(conv-relu-conv-relu-conv(x) + x); `conv.1`/`conv.3` are the relus."""

    def __init__(self, channels: int):
        super().__init__()
        conv = lambda: Conv2d(channels, channels, kernel_size=3, padding=1)  # noqa: E731
        self.conv = [conv(), Placeholder(nn.relu), conv(), Placeholder(nn.relu), conv()]
        # diffusers' `skip` is a 1×1 conv only when channels change, which its encoder/decoder never do.

    def __call__(self, x: mx.array) -> mx.array:
        # The relus and the skip are the convs' epilogues: one pass each where the ops fuse them.
        h = self.conv[0](x, activation="relu")
        h = self.conv[2](h, activation="relu")
        return self.conv[4](h, residual=x, activation="relu")


class EncoderTiny(nn.Module):
    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        channels = config.encoder_block_out_channels
        layers: list[nn.Module] = []
        for i, num_blocks in enumerate(config.num_encoder_blocks):
            if i == 0:
                layers.append(Conv2d(config.in_channels, channels[0], kernel_size=3, padding=1))
            else:
                layers.append(Conv2d(channels[i], channels[i], kernel_size=3, stride=2, padding=1, bias=False))
            layers.extend(TinyBlock(channels[i]) for _ in range(num_blocks))
        layers.append(Conv2d(channels[-1], config.latent_channels, kernel_size=3, padding=1))
        self.layers = layers

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class NearestUpsample(Placeholder):
    """The slot of diffusers' `nn.Upsample(scale_factor, mode="nearest")`."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def size(self, x: mx.array) -> tuple[int, int]:
        return self.factor * x.shape[1], self.factor * x.shape[2]

    def __call__(self, x: mx.array) -> mx.array:
        return upsample_nearest(x, self.size(x))


def run_layers(layers: list[nn.Module], x: mx.array) -> mx.array:
    """Apply a checkpoint-indexed layer list, fusing a ReLU placeholder into the conv before it and an
    upsample into the conv after it."""
    i = 0
    while i < len(layers):
        layer = layers[i]
        following = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, Conv2d) and getattr(following, "_fn", None) is nn.relu:
            x, i = layer(x, activation="relu"), i + 2
        elif isinstance(layer, NearestUpsample) and isinstance(following, Conv2d):
            x, i = following.upsampled(x, layer.size(x)), i + 2
        else:
            x, i = layer(x), i + 1
    return x


class DecoderTiny(nn.Module):
    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        channels = config.decoder_block_out_channels
        factor = config.upsampling_scaling_factor
        layers: list[nn.Module] = [
            Conv2d(config.latent_channels, channels[0], kernel_size=3, padding=1),
            Placeholder(nn.relu),
        ]
        last = len(channels) - 1
        for i, num_blocks in enumerate(config.num_decoder_blocks):
            layers.extend(TinyBlock(channels[i]) for _ in range(num_blocks))
            if i != last:
                layers.append(NearestUpsample(factor))
            out = channels[i] if i != last else config.out_channels
            layers.append(Conv2d(channels[i], out, kernel_size=3, padding=1, bias=i == last))
        self.layers = layers

    def __call__(self, x: mx.array) -> mx.array:
        return run_layers(self.layers, x)


class AutoencoderTiny(nn.Module):
    """TAESD encoder + decoder. `encode(image in [-1, 1]) -> latents`, `decode(latents) -> image in [-1, 1]`."""

    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = EncoderTiny(config)
        self.decoder = DecoderTiny(config)

    def encode(self, image: mx.array) -> mx.array:
        """NHWC image in [-1, 1] → raw NHWC latents (what diffusers' `encode(x).latents` returns)."""
        return self.encoder((image + 1) / 2)

    def decode(self, latents: mx.array) -> mx.array:
        """Raw NHWC latents → NHWC image in [-1, 1]; inputs are soft-clamped to ±3 first, as TAESD was trained."""
        latents = mx.tanh(latents / 3) * 3
        return self.decoder(latents) * 2 - 1

    def __call__(self, image: mx.array) -> mx.array:
        return self.decode(self.encode(image))

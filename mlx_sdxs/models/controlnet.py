"""ControlNet (diffusers `ControlNetModel`, 0.42.1) in MLX, NHWC: a copy of the UNet's down path and mid block
that reads a control image (a sketch, edges) and returns residuals for the UNet's skips and the bottom of its
down path — what the SDXS-512-DreamShaper Sketch model is.

Parameter names equal diffusers' keys (`controlnet_cond_embedding.*`, `controlnet_down_blocks.N`,
`controlnet_mid_block`, and the UNet's for the shared blocks). The config is the UNet's plus the
ControlNet's own fields, read by `ControlNetConfig.from_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_sdxs.errors import ConfigError
from mlx_sdxs.models.layers import Conv2d
from mlx_sdxs.models.unet import DOWN_BLOCK_TYPES, Conditioning, ConditionedNetwork, UNetConfig

#: A down block's mirror on the way up: a ControlNet config has no up blocks, UNetConfig wants them.
_UP_FOR_DOWN = {"DownBlock2D": "UpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D"}


@dataclass(frozen=True)
class ControlNetConfig:
    unet: UNetConfig
    conditioning_channels: int
    conditioning_embedding_out_channels: tuple[int, ...]
    #: "rgb" or "bgr": the order the control image's channels are trained in (converted from RGB here).
    channel_order: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ControlNetConfig":
        """A diffusers `controlnet/config.json` dict; unknown keys are ignored, unsupported values refused."""
        if d.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise ConfigError(f"controlnet config: mid_block_type={d.get('mid_block_type')!r} is not supported "
                              "(only 'UNetMidBlock2DCrossAttn', as diffusers' ControlNetModel)")
        if d.get("global_pool_conditions", False):
            raise ConfigError("controlnet config: global_pool_conditions=true (a shuffle-style ControlNet) is not supported")
        order = d.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise ConfigError(f"controlnet config: controlnet_conditioning_channel_order={order!r} (expected rgb or bgr)")
        down = d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        if not isinstance(down, (list, tuple)) or any(t not in DOWN_BLOCK_TYPES for t in down):
            raise ConfigError(f"controlnet config: down_block_types={down!r} is not supported "
                              f"(supported: {list(DOWN_BLOCK_TYPES)})")
        unet = UNetConfig.from_dict({**d, "up_block_types": [_UP_FOR_DOWN[t] for t in reversed(down)],
                                     "mid_block_type": "UNetMidBlock2DCrossAttn"})
        channels = d.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
        if not isinstance(channels, (list, tuple)) or any(not isinstance(c, int) or isinstance(c, bool) or c < 1
                                                           for c in channels):
            raise ConfigError(f"controlnet config: conditioning_embedding_out_channels={channels!r} is invalid")
        conditioning = d.get("conditioning_channels", 3)
        if conditioning != 3 or isinstance(conditioning, bool):
            raise ConfigError(f"controlnet config: conditioning_channels={conditioning!r} is not supported (control "
                              "images here are RGB: 3)")
        return cls(replace(unet, conv_in_kernel=3), conditioning, tuple(channels), order)

    @property
    def latent_channels(self) -> int:
        return self.unet.in_channels


class ControlNetConditioningEmbedding(nn.Module):
    """The control image (B, H, W, 3) in [0, 1] → features at the latent size: a 3×3 conv, then pairs of a 3×3
    conv and a stride-2 one (SiLU after each), then a 3×3 conv out to the UNet's first width."""

    def __init__(self, out_channels: int, in_channels: int, channels: tuple[int, ...]):
        super().__init__()
        self.conv_in = Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = []
        for current, following in zip(channels, channels[1:]):
            self.blocks += [Conv2d(current, current, 3, padding=1), Conv2d(current, following, 3, stride=2, padding=1)]
        self.conv_out = Conv2d(channels[-1], out_channels, 3, padding=1)

    def __call__(self, image: mx.array) -> mx.array:
        x = self.conv_in(image, activation="silu")
        for block in self.blocks:
            x = block(x, activation="silu")
        return self.conv_out(x)


class ControlNetModel(ConditionedNetwork):
    """`(sample, conditioning, control image, scale) → (down residuals, mid residual)` for the UNet."""

    def __init__(self, config: ControlNetConfig):
        super().__init__(config.unet)
        self.controlnet_config = config
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            config.unet.block_out_channels[0], config.conditioning_channels, config.conditioning_embedding_out_channels)
        self.controlnet_down_blocks = [Conv2d(c, c, 1) for c in self.skip_channels()]
        width = config.unet.block_out_channels[-1]
        self.controlnet_mid_block = Conv2d(width, width, 1)
        self._index_conditioning()

    def __call__(self, sample: mx.array, timestep: float | mx.array, encoder_hidden_states: mx.array,
                 control_image: mx.array, scale: float | mx.array = 1.0) -> tuple[list[mx.array], mx.array]:
        """`control_image` (B, H, W, C) RGB in [0, 1] at the image size (8× the latent's)."""
        return self.residuals(sample, self.conditioning(timestep, encoder_hidden_states), control_image, scale)

    def residuals(self, sample: mx.array, cond: Conditioning, control_image: mx.array,
                  scale: float | mx.array = 1.0) -> tuple[list[mx.array], mx.array]:
        """The per-frame part: the UNet's down residuals and mid residual, each × `scale` (the control strength)."""
        scale = mx.array(scale).astype(sample.dtype)  # a float32 array would lift float16 residuals to float32
        if self.controlnet_config.channel_order == "bgr":
            control_image = control_image[..., ::-1]
        control = self.controlnet_cond_embedding(control_image.astype(sample.dtype))
        x, skips = self._down(self.conv_in(sample, residual=control), cond)
        x = self.mid_block(x, cond)
        down = [block(skip) * scale for block, skip in zip(self.controlnet_down_blocks, skips, strict=True)]
        return down, self.controlnet_mid_block(x) * scale

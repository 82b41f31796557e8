"""What the camera loop and the bench need from an inference backend, and the frame I/O every backend shares.

The per-frame recipe (the seed system's `process_frame`, ochyai/streamdiffusion-mac) is the same in
every backend; only the array library differs:

    centre crop → resize to render size → BGR→RGB → [-1, 1] → VAE encode
    → latent = (1 − feedback)·latent + feedback·previous_denoised
    → noisy = √ᾱ·latent + √(1−ᾱ)·fixed_noise            (noise drawn once, seeded)
    → ε = UNet(noisy, t, prompt_embeds)
    → denoised = (noisy − √(1−ᾱ)·ε)/√ᾱ                  (kept as previous_denoised)
    → VAE decode → [0, 255] → RGB→BGR

and on a prompt change `embeds += morph·(target − embeds)` once per frame (seed: morph = 0.05).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from mlx_sdxs.errors import ImageError

STAGES = ("preprocess", "encode", "unet", "decode", "postprocess")
LATENT_SCALE = 8  # VAE spatial downsampling of every SD-family checkpoint


@dataclass(frozen=True)
class RecipeSettings:
    """Knobs of the per-frame recipe, identical for every backend so their outputs can be compared."""

    render_size: int = 512
    feedback: float = 0.1
    seed: int = 42
    prompt_morph: float = 0.05
    #: None: the scheduler's one-step timestep (SDXS: t=999); else img2img at this strength (SD-Turbo).
    strength: float | None = None


def fixed_noise(settings: RecipeSettings, latent_channels: int = 4) -> np.ndarray:
    """The noise drawn once per stream, NHWC float32 (1, s/8, s/8, C); numpy so every backend gets the same."""
    side = settings.render_size // LATENT_SCALE
    rng = np.random.default_rng(settings.seed)
    return rng.standard_normal((1, side, side, latent_channels), dtype=np.float32)


@runtime_checkable
class Backend(Protocol):
    """An img2img engine the 3-thread loop can drive. Nothing in the loop knows which one runs."""

    name: str
    render_size: int
    #: When True, `process` synchronises at stage boundaries and fills `last_stage_ms` (bench only:
    #: it defeats overlap, so the camera loop leaves it off).
    profile_stages: bool
    last_stage_ms: dict[str, float]

    def set_prompt(self, prompt: str) -> None:
        """Target a new prompt; the first call sets it at once, later ones morph towards it frame by frame."""

    def warmup(self) -> None:
        """Run enough frames that the first real frame pays no compile/allocation cost."""

    def process(self, frame_bgr: np.ndarray) -> np.ndarray:
        """One camera frame (uint8 BGR, any size) → one stylised frame (uint8 BGR, render_size²)."""

    def close(self) -> None:
        """Release models/devices; idempotent."""


class WarmupKeepsState:
    """`warmup` for backends whose stream state is `previous_denoised` and `embeds`: run grey frames, then
    restore that state so the first real frame starts clean."""

    def warmup(self, frames: int = 2) -> None:
        state = (self.previous_denoised, self.embeds)
        grey = np.full((self.render_size, self.render_size, 3), 127, dtype=np.uint8)
        for _ in range(frames):
            self.process(grey)
        self.previous_denoised, self.embeds = state


def center_crop_resize(frame: np.ndarray, size: int) -> np.ndarray:
    """Centre crop to a square, then resize to `size`² (INTER_AREA shrinking, INTER_LINEAR growing)."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] < 1 or frame.shape[1] < 1:
        raise ImageError(f"expected an H×W×3 frame, got shape {frame.shape}")
    height, width = frame.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = frame[top : top + side, left : left + side]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return square if side == size else cv2.resize(square, (size, size), interpolation=interpolation)


def frame_to_model_input(frame_bgr: np.ndarray, size: int) -> np.ndarray:
    """uint8 BGR frame → float32 RGB in [-1, 1], shape (size, size, 3) (NHWC without the batch)."""
    square = center_crop_resize(frame_bgr, size)
    rgb = cv2.cvtColor(square, cv2.COLOR_BGR2RGB)
    return rgb.astype(np.float32) * (2.0 / 255.0) - 1.0


def model_output_to_frame(image: np.ndarray) -> np.ndarray:
    """float RGB in [-1, 1], shape (H, W, 3) → uint8 BGR (rounded, clipped)."""
    rgb = np.clip((np.asarray(image, dtype=np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)

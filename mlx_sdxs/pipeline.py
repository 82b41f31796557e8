"""One-step SDXS pipelines on MLX: txt2img, strength img2img and the seed paper's camera stream.

No threads and no file I/O here: images come in and go out as numpy arrays (RGB uint8 at the API,
[-1, 1] NHWC inside). The per-frame recipe is documented in `backends/base.py`.
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sdxs import hub
from mlx_sdxs.backends.base import LATENT_SCALE, RecipeSettings, center_crop_resize, fixed_noise
from mlx_sdxs.errors import ConfigError, ImageError
from mlx_sdxs.models.layers import reserve_cpu_buffer_cache
from mlx_sdxs.scheduler import OneStepScheduler, SchedulerConfig
from mlx_sdxs.tokenizer import CLIPTokenizer, byte_level_tokenizer, load_tokenizer
from mlx_sdxs.weights import build_model, load_text_encoder, load_unet, load_vae

PRESETS = Path(__file__).parent / "presets"
RANDOM_MODELS = {"random": "sdxs-512-0.9", "random-tiny": "tiny"}
RANDOM_LABEL = "RANDOM WEIGHTS - not a trained model"
SDXS_MUD_WARNING = (
    "SDXS is distilled for t=999 only: img2img at strength < 1 degrades to 'mud' (IDKiro/sdxs issues #10, #24). "
    "Use stabilityai/sd-turbo for strength-based img2img, or leave --strength unset for SDXS."
)
_PROMPT_CACHE_SIZE = 32


def default_dtype() -> mx.Dtype:
    """fp16 on a GPU (Metal/CUDA); fp32 on CPU, where MLX's fp16/bf16 matmul is ~100x slower."""
    return mx.float16 if mx.default_device() == mx.gpu else mx.float32


def dtype_name(dtype: mx.Dtype) -> str:
    return {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}[dtype]


class SDXSPipeline:
    """The three models, the tokenizer and the scheduler of one checkpoint, with cached prompt embeddings."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: CLIPTokenizer,
                 scheduler: OneStepScheduler, dtype: mx.Dtype = mx.float32, name: str = "", label: str | None = None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler, self.dtype, self.name = scheduler, dtype, name
        #: Shown on every output when set (random-weight models say so).
        self.label = label
        self.latent_channels = unet.config.in_channels
        self.scaling_factor = vae.config.scaling_factor
        # The UNet halves the latent once per level below the first: sizes must divide by this.
        self.size_multiple = LATENT_SCALE * 2 ** (len(unet.config.block_out_channels) - 1)
        self._prompts: OrderedDict[str, mx.array] = OrderedDict()
        reserve_cpu_buffer_cache()

    # --- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str = hub.DEFAULT_MODEL, dtype: mx.Dtype | None = None, vae: str | None = None,
                        weights_root: str | Path | None = None, offline: bool | None = None) -> "SDXSPipeline":
        """A Hub repo id, a local diffusers checkpoint, a converted folder, or "random"/"random-tiny"."""
        dtype = dtype or default_dtype()
        if model in RANDOM_MODELS:
            return cls.random(model, dtype=dtype)
        folder = hub.resolve(model, dtype_name(dtype), vae, Path(weights_root) if weights_root else None, offline)
        return cls.from_weights(folder, dtype, name=model)

    @classmethod
    def from_weights(cls, folder: str | Path, dtype: mx.Dtype | None = None, name: str | None = None) -> "SDXSPipeline":
        """Load a converted MLX weights folder (see `mlx_sdxs.convert`)."""
        folder = Path(folder)
        dtype = dtype or default_dtype()
        return cls(
            load_unet(folder / "unet", dtype),
            load_vae(folder / "vae", dtype),
            load_text_encoder(folder / "text_encoder", dtype),
            load_tokenizer(folder / "tokenizer"),
            OneStepScheduler(SchedulerConfig.from_file(folder / "scheduler" / "scheduler_config.json")),
            dtype,
            name=name or folder.name,
        )

    @classmethod
    def random(cls, model: str = "random", seed: int = 0, dtype: mx.Dtype | None = None) -> "SDXSPipeline":
        """Random weights in a real checkpoint's shape, for running everything offline. Not a trained model."""
        preset = PRESETS / RANDOM_MODELS.get(model, model)
        if not preset.is_dir():
            raise ConfigError(f"--model {model!r}: no preset {preset.name!r} (have: {', '.join(RANDOM_MODELS)})")
        dtype = dtype or default_dtype()
        mx.random.seed(seed)
        models = {}
        for component in ("unet", "vae", "text_encoder"):
            config = json.loads((preset / component / "config.json").read_text())
            module = build_model(config, component)
            module.set_dtype(dtype)
            module.eval()
            mx.eval(module.parameters())
            models[component] = module
        scheduler = OneStepScheduler(SchedulerConfig.from_file(preset / "scheduler" / "scheduler_config.json"))
        return cls(models["unet"], models["vae"], models["text_encoder"], byte_level_tokenizer(), scheduler, dtype,
                   name=f"{model} ({preset.name} shape)", label=RANDOM_LABEL)

    # --- building blocks ---------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> mx.array:
        """CLIP embeddings (1, 77, D), computed once per prompt and kept in a small LRU cache."""
        if prompt in self._prompts:
            self._prompts.move_to_end(prompt)
            return self._prompts[prompt]
        if self.tokenizer.is_truncated(prompt):
            warnings.warn(f"prompt is longer than the text encoder's {self.tokenizer.max_length} tokens and was "
                          f"truncated: {prompt[:60]!r}…", stacklevel=2)
        ids = mx.array(self.tokenizer([prompt]))
        embeds = self.text_encoder(ids).astype(self.dtype)
        mx.eval(embeds)
        self._prompts[prompt] = embeds
        if len(self._prompts) > _PROMPT_CACHE_SIZE:
            self._prompts.popitem(last=False)
        return embeds

    def check_size(self, size: int) -> None:
        if size < self.size_multiple or size % self.size_multiple:
            raise ImageError(f"size {size}: must be a positive multiple of {self.size_multiple} for this model")

    def encode(self, image: mx.array) -> mx.array:
        """[-1, 1] NHWC image → scaled latent."""
        return self.vae.encode(image.astype(self.dtype)) * self.scaling_factor

    def decode(self, latent: mx.array) -> mx.array:
        """Scaled latent → [-1, 1] NHWC image."""
        return self.vae.decode(latent / self.scaling_factor)

    def denoise(self, noisy: mx.array, timestep: int, embeds: mx.array) -> mx.array:
        """One UNet call and the epsilon → x0 formula."""
        sqrt_alpha, sqrt_one_minus = self.scheduler.coefficients(timestep)
        eps = self.unet(noisy, mx.array([timestep]), embeds)
        return (noisy - sqrt_one_minus * eps) / sqrt_alpha

    def noise(self, seed: int, size: int) -> mx.array:
        settings = RecipeSettings(render_size=size, seed=seed)
        return mx.array(fixed_noise(settings, self.latent_channels)).astype(self.dtype)

    # --- user-facing generation ---------------------------------------------------------------
    def txt2img(self, prompt: str, seed: int = 0, size: int = 512, noise: np.ndarray | None = None) -> np.ndarray:
        """One step from pure noise (guidance 0) → RGB uint8 (size, size, 3)."""
        self.check_size(size)
        latent = self.noise(seed, size) if noise is None else mx.array(noise).astype(self.dtype)
        denoised = self.denoise(latent, self.scheduler.one_step_timestep(), self.encode_prompt(prompt))
        return to_uint8(self.decode(denoised))[0]

    def img2img(self, image: np.ndarray, prompt: str, strength: float | None = None, seed: int = 0, size: int = 512,
                noise: np.ndarray | None = None) -> np.ndarray:
        """One step from an RGB uint8 image (centre-cropped and resized to `size`²) → RGB uint8.

        `strength=None` runs at the model's one-step timestep (SDXS: t=999, as the camera does);
        a strength in (0, 1] picks t = timesteps₅₀[int(50·(1−strength))] (SD-Turbo style).
        """
        self.check_size(size)
        if strength is not None and strength < 1.0 and self.is_sdxs:
            warnings.warn(SDXS_MUD_WARNING, stacklevel=2)
        timestep = self.scheduler.one_step_timestep(strength)
        sqrt_alpha, sqrt_one_minus = self.scheduler.coefficients(timestep)
        latent = self.encode(from_uint8(center_crop_resize(_as_rgb(image), size)))
        noise = self.noise(seed, size) if noise is None else mx.array(noise).astype(self.dtype)
        noisy = sqrt_alpha * latent + sqrt_one_minus * noise
        return to_uint8(self.decode(self.denoise(noisy, timestep, self.encode_prompt(prompt))))[0]

    @property
    def is_sdxs(self) -> bool:
        return "sdxs" in self.name.lower() or self.label == RANDOM_LABEL

    def stream(self, settings: RecipeSettings, prompt: str) -> "ImageStream":
        self.check_size(settings.render_size)
        return ImageStream(self, settings, prompt)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": dtype_name(self.dtype), "label": self.label,
                "unet_parameters": _count(self.unet), "vae": type(self.vae).__name__,
                "text_encoder_parameters": _count(self.text_encoder)}


class ImageStream:
    """The seed paper's camera img2img: fixed noise, latent feedback, smooth prompt morphing.

    State between frames: the previous denoised latent and the current/target prompt embeddings.
    """

    def __init__(self, pipeline: SDXSPipeline, settings: RecipeSettings, prompt: str):
        self.pipeline, self.settings = pipeline, settings
        self.timestep = pipeline.scheduler.one_step_timestep(settings.strength)
        self.sqrt_alpha, sqrt_one_minus = pipeline.scheduler.coefficients(self.timestep)
        # The noise never changes, so its scaled term is computed once.
        self.noise_term = sqrt_one_minus * mx.array(fixed_noise(settings, pipeline.latent_channels)).astype(pipeline.dtype)
        self.embeds = self.target = pipeline.encode_prompt(prompt)
        self.previous: mx.array | None = None
        # Evaluate now: MLX graphs are bound to the creating thread's stream, and the camera loop
        # runs frames on its inference thread.
        mx.eval(self.noise_term)

    def set_prompt(self, prompt: str) -> None:
        """Morph towards `prompt` over the next frames (seed: 5 % of the remaining distance per frame)."""
        self.target = self.pipeline.encode_prompt(prompt)

    def encode(self, image: mx.array) -> mx.array:
        latent = self.pipeline.encode(image)
        if self.previous is not None:
            latent = (1.0 - self.settings.feedback) * latent + self.settings.feedback * self.previous
        return latent

    def denoise(self, latent: mx.array) -> mx.array:
        if self.target is not self.embeds:
            self.embeds = self.embeds + self.settings.prompt_morph * (self.target - self.embeds)
        noisy = self.sqrt_alpha * latent + self.noise_term
        self.previous = self.pipeline.denoise(noisy, self.timestep, self.embeds)
        return self.previous

    def __call__(self, image: mx.array) -> mx.array:
        """[-1, 1] NHWC frame (1, s, s, 3) → [-1, 1] NHWC output; lazy (the caller evaluates)."""
        return self.pipeline.decode(self.denoise(self.encode(image)))


def from_uint8(rgb: np.ndarray) -> mx.array:
    """RGB uint8 (H, W, 3) → [-1, 1] float32 NHWC batch of one."""
    return mx.array(rgb[None].astype(np.float32) * (2.0 / 255.0) - 1.0)


def to_uint8(image: mx.array) -> np.ndarray:
    """[-1, 1] NHWC → RGB uint8, rounded like diffusers' postprocessing."""
    scaled = mx.clip((image.astype(mx.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(mx.uint8)
    return np.array(scaled)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    return image


def _count(module: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(module.parameters()))

"""The recipe of `base` in numpy, for backends that run exported graphs (CoreML, ONNX Runtime).

Such a backend only supplies three calls on NCHW float32 arrays — `_encode(image)`,
`_unet(sample, timestep, embeds)`, `_decode(latents)` — and a prompt encoder; the stream state
(feedback, fixed noise, prompt morph) and stage timing live here, once.

Exported folders (`python -m convert.coreml` / `convert.onnx`) carry a `manifest.json`
described by `ExportManifest`; its graphs take and return UNet-space latents (VAE scaling
already applied inside the encoder/decoder graphs).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mlx_sdxs.backends.base import STAGES, RecipeSettings, WarmupKeepsState, fixed_noise, frame_to_model_input, model_output_to_frame
from mlx_sdxs.errors import ConfigError
from mlx_sdxs.scheduler import OneStepScheduler, SchedulerConfig

MANIFEST_FILE = "manifest.json"
#: Graph input/output names, identical in the CoreML and ONNX exports.
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
UNET_OUTPUT = "noise_pred"
ENCODER_INPUT, ENCODER_OUTPUT = "image", "latents"
DECODER_INPUT, DECODER_OUTPUT = "latents", "image"

PromptEncoder = Callable[[str], np.ndarray]


@dataclass
class ExportManifest:
    """What an export folder holds and where the parts it does not hold (text encoder, scheduler) live."""

    format: str  # "coreml" or "onnx"
    render_size: int
    precision: str
    latent_channels: int
    text_dim: int
    #: The source diffusers checkpoint: its tokenizer/ text_encoder/ scheduler/ are used from there.
    checkpoint: str
    #: component ("unet", "vae_encoder", "vae_decoder") → file name inside the export folder.
    files: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    outputs: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    latents_scaled: bool = True

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path, expected_format: str) -> "ExportManifest":
        path = Path(folder) / MANIFEST_FILE
        if not path.is_file():
            raise ConfigError(f"{path}: missing (export with "
                              f"`python -m convert.{expected_format} CHECKPOINT {folder}`)")
        try:
            data = json.loads(path.read_text())
            manifest = cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"{path}: not a valid export manifest ({exc})") from None
        if manifest.format != expected_format:
            raise ConfigError(f"{path}: format is {manifest.format!r}, expected {expected_format!r}")
        return manifest

    def checkpoint_dir(self, override: str | Path | None) -> Path:
        """The source checkpoint (or `override`), checked to still hold what the backend reads from it."""
        folder = Path(override) if override is not None else Path(self.checkpoint)
        for part in ("tokenizer", "text_encoder", "scheduler/scheduler_config.json"):
            if not (folder / part).exists():
                raise ConfigError(f"{folder / part}: missing; pass checkpoint_dir= pointing at the diffusers "
                                  f"checkpoint the export came from (manifest 'checkpoint': {self.checkpoint})")
        return folder


def torch_clip_prompt_encoder(checkpoint_dir: Path) -> PromptEncoder:
    """Prompt → (1, 77, D) float32 numpy via transformers CLIP (runs once per prompt, so speed is moot)."""
    from mlx_sdxs.backends.torch_backend import ClipPromptEncoder

    encoder = ClipPromptEncoder(checkpoint_dir)
    return lambda prompt: encoder(prompt).numpy().astype(np.float32)


class NumpyRecipeBackend(WarmupKeepsState):
    """Stream state and per-frame recipe; subclasses implement `_encode`, `_unet`, `_decode` (NCHW float32)."""

    name = "numpy-recipe"

    def __init__(self, export_dir: str | Path, export_format: str, settings: RecipeSettings,
                 checkpoint_dir: str | Path | None = None, prompt_encoder: PromptEncoder | None = None):
        """Read `export_dir`'s manifest (checked against `settings`); the text encoder and scheduler come from
        the source checkpoint it names (or `checkpoint_dir`)."""
        self.export_dir = Path(export_dir)
        self.manifest = ExportManifest.load(self.export_dir, export_format)
        if self.manifest.render_size != settings.render_size:
            raise ConfigError(f"{self.export_dir}: exported for render size {self.manifest.render_size}, settings ask "
                              f"for {settings.render_size}; re-export with --render-size {settings.render_size}")
        checkpoint = self.manifest.checkpoint_dir(checkpoint_dir)
        scheduler_config = checkpoint / "scheduler" / "scheduler_config.json"
        latent_channels = self.manifest.latent_channels
        prompt_encoder = prompt_encoder or torch_clip_prompt_encoder(checkpoint)
        self.settings = settings
        self.render_size = settings.render_size
        self.profile_stages = False
        self.last_stage_ms: dict[str, float] = {}
        self.prompt_encoder = prompt_encoder

        scheduler = OneStepScheduler(SchedulerConfig.from_file(scheduler_config))
        self.timestep = scheduler.one_step_timestep(settings.strength)
        self.sqrt_alpha, self.sqrt_one_minus_alpha = (np.float32(c) for c in scheduler.coefficients(self.timestep))
        self.noise = np.ascontiguousarray(fixed_noise(settings, latent_channels).transpose(0, 3, 1, 2))

        self.previous_denoised: np.ndarray | None = None
        self.embeds: np.ndarray | None = None
        self.target_embeds: np.ndarray | None = None

    def _encode(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _unet(self, sample: np.ndarray, timestep: np.ndarray, embeds: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _decode(self, latents: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def prompt_embeds(self) -> np.ndarray:
        return self.embeds

    def set_prompt(self, prompt: str) -> None:
        embeds = np.asarray(self.prompt_encoder(prompt), dtype=np.float32)
        if self.embeds is None:
            self.embeds = embeds
        else:
            self.target_embeds = embeds

    def process(self, frame_bgr: np.ndarray) -> np.ndarray:
        if self.embeds is None:
            raise ValueError("set_prompt must be called before process")
        s = self.settings
        marks = [time.perf_counter()]
        image = np.ascontiguousarray(frame_to_model_input(frame_bgr, self.render_size).transpose(2, 0, 1)[None])
        marks.append(time.perf_counter())

        latents = self._encode(image)
        if self.previous_denoised is not None:
            latents = np.float32(1.0 - s.feedback) * latents + np.float32(s.feedback) * self.previous_denoised
        noisy = self.sqrt_alpha * latents + self.sqrt_one_minus_alpha * self.noise
        marks.append(time.perf_counter())

        if self.target_embeds is not None:
            self.embeds = self.embeds + np.float32(s.prompt_morph) * (self.target_embeds - self.embeds)
        epsilon = self._unet(noisy, np.array([self.timestep], dtype=np.float32), self.embeds)
        self.previous_denoised = (noisy - self.sqrt_one_minus_alpha * epsilon) / self.sqrt_alpha
        marks.append(time.perf_counter())

        decoded = self._decode(self.previous_denoised)
        marks.append(time.perf_counter())
        frame = model_output_to_frame(decoded[0].transpose(1, 2, 0))
        marks.append(time.perf_counter())
        # Every call here is synchronous, so timing costs nothing and is always recorded.
        self.last_stage_ms = {stage: 1000.0 * (b - a) for stage, a, b in zip(STAGES, marks, marks[1:])}
        return frame

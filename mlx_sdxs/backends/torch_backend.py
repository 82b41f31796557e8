"""The PyTorch/diffusers backend: what users would otherwise run, and the oracle of the other backends.

It loads a diffusers checkpoint folder with diffusers/transformers and runs the recipe of `base`
in torch (NCHW, on cpu/cuda/mps). The three graph wrappers below are also what `convert/`
exports to CoreML and ONNX, so every backend agrees on one definition of "VAE encode":
image in [-1, 1] → latents already multiplied by the VAE's `scaling_factor` (UNet space), and
"VAE decode": UNet-space latents → image in [-1, 1].

Only the comparison backends and `convert/` import this module; the MLX path never does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from mlx_sdxs.backends.base import STAGES, RecipeSettings, WarmupKeepsState, fixed_noise, frame_to_model_input, model_output_to_frame
from mlx_sdxs.errors import BackendUnavailable, WeightsError
from mlx_sdxs.scheduler import OneStepScheduler, SchedulerConfig

MAX_PROMPT_TOKENS = 77


class UNetEpsilon(torch.nn.Module):
    """UNet(sample, timestep, encoder_hidden_states) → ε as a plain tensor (exportable signature)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VAEEncoder(torch.nn.Module):
    """Image in [-1, 1] (N, 3, H, W) → UNet-space latents: TAESD's, or the KL posterior mean, × scaling_factor."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        self.is_tiny = type(vae).__name__ == "AutoencoderTiny"
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encoder(image) if self.is_tiny else self.vae.encode(image).latent_dist.mean
        return latents * self.scaling_factor


class VAEDecoder(torch.nn.Module):
    """UNet-space latents → image in [-1, 1] (÷ scaling_factor first)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        self.is_tiny = type(vae).__name__ == "AutoencoderTiny"
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents / self.scaling_factor
        return self.vae.decoder(latents) if self.is_tiny else self.vae.decode(latents, return_dict=False)[0]


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise WeightsError(f"{path}: missing ({what} of a diffusers checkpoint folder)")
    return path


def load_unet(checkpoint_dir: str | Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(_require(Path(checkpoint_dir) / "unet", "the UNet")).eval()


def load_vae(checkpoint_dir: str | Path) -> torch.nn.Module:
    """AutoencoderTiny (TAESD) or AutoencoderKL, whichever `vae/config.json` names."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    folder = _require(Path(checkpoint_dir) / "vae", "the VAE")
    class_name = json.loads(_require(folder / "config.json", "the VAE config").read_text()).get("_class_name")
    classes = {"AutoencoderTiny": AutoencoderTiny, "AutoencoderKL": AutoencoderKL}
    if class_name not in classes:
        raise WeightsError(f"{folder / 'config.json'}: _class_name {class_name!r} is not a supported VAE "
                           f"({', '.join(classes)})")
    return classes[class_name].from_pretrained(folder).eval()


def load_scheduler(checkpoint_dir: str | Path) -> OneStepScheduler:
    return OneStepScheduler(SchedulerConfig.from_file(Path(checkpoint_dir) / "scheduler" / "scheduler_config.json"))


class ClipPromptEncoder:
    """Prompt → CLIP last hidden state (1, 77, D), with transformers' CLIPTokenizer + CLIPTextModel."""

    def __init__(self, checkpoint_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import CLIPTextModel, CLIPTokenizer

        checkpoint_dir = Path(checkpoint_dir)
        self.tokenizer = CLIPTokenizer.from_pretrained(_require(checkpoint_dir / "tokenizer", "the tokenizer"))
        folder = _require(checkpoint_dir / "text_encoder", "the text encoder")
        self.model = CLIPTextModel.from_pretrained(folder).to(device=device, dtype=dtype).eval()
        self.device = device

    @torch.inference_mode()
    def __call__(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(prompt, padding="max_length", max_length=MAX_PROMPT_TOKENS, truncation=True,
                             return_tensors="pt").input_ids
        return self.model(ids.to(self.device))[0]


def _check_device(device: str) -> None:
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device not in available:
        raise BackendUnavailable(f"torch device must be one of {', '.join(available)}, not {device!r}")
    if not available[device]:
        raise BackendUnavailable(f"torch device {device!r} is not available on this machine (try device='cpu')")


class TorchBackend(WarmupKeepsState):
    """The recipe of `base` in PyTorch on a diffusers checkpoint folder."""

    def __init__(self, checkpoint_dir: str | Path, settings: RecipeSettings = RecipeSettings(), device: str = "cpu",
                 dtype: torch.dtype = torch.float32, prompt: str | None = None):
        _check_device(device)
        self.name = f"torch-{device}"
        self.settings = settings
        self.render_size = settings.render_size
        self.profile_stages = False
        self.last_stage_ms: dict[str, float] = {}
        self.device, self.dtype = device, dtype

        self.unet = UNetEpsilon(load_unet(checkpoint_dir)).to(device=device, dtype=dtype)
        vae = load_vae(checkpoint_dir).to(device=device, dtype=dtype)
        self.encoder, self.decoder = VAEEncoder(vae), VAEDecoder(vae)
        self.prompt_encoder = ClipPromptEncoder(checkpoint_dir, device, dtype)

        scheduler = load_scheduler(checkpoint_dir)
        self.timestep = scheduler.one_step_timestep(settings.strength)
        self.sqrt_alpha, self.sqrt_one_minus_alpha = scheduler.coefficients(self.timestep)
        self._timestep = torch.tensor([self.timestep], device=device, dtype=dtype)
        latent_channels = int(vae.config.latent_channels)
        noise = fixed_noise(settings, latent_channels).transpose(0, 3, 1, 2)
        self.noise = torch.from_numpy(np.ascontiguousarray(noise)).to(device=device, dtype=dtype)

        self.previous_denoised: torch.Tensor | None = None
        self.embeds: torch.Tensor | None = None
        self.target_embeds: torch.Tensor | None = None
        if prompt is not None:
            self.set_prompt(prompt)

    @property
    def prompt_embeds(self) -> np.ndarray:
        """The embeddings the next UNet call would morph from, as float32 numpy (1, 77, D)."""
        return self.embeds.float().cpu().numpy()

    def set_prompt(self, prompt: str) -> None:
        embeds = self.prompt_encoder(prompt)
        if self.embeds is None:
            self.embeds = embeds
        else:
            self.target_embeds = embeds

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        elif self.device == "mps":
            torch.mps.synchronize()

    @torch.inference_mode()
    def process(self, frame_bgr: np.ndarray) -> np.ndarray:
        if self.embeds is None:
            raise ValueError("set_prompt must be called before process")
        marks = [time.perf_counter()]

        def stage_done() -> None:
            if self.profile_stages:
                self._sync()
                marks.append(time.perf_counter())

        image = frame_to_model_input(frame_bgr, self.render_size).transpose(2, 0, 1)[None]
        image = torch.from_numpy(np.ascontiguousarray(image)).to(device=self.device, dtype=self.dtype)
        stage_done()

        latents = self.encoder(image)
        if self.previous_denoised is not None:
            latents = (1.0 - self.settings.feedback) * latents + self.settings.feedback * self.previous_denoised
        noisy = self.sqrt_alpha * latents + self.sqrt_one_minus_alpha * self.noise
        stage_done()

        if self.target_embeds is not None:
            self.embeds = self.embeds + self.settings.prompt_morph * (self.target_embeds - self.embeds)
        epsilon = self.unet(noisy, self._timestep, self.embeds)
        denoised = (noisy - self.sqrt_one_minus_alpha * epsilon) / self.sqrt_alpha
        self.previous_denoised = denoised
        stage_done()

        decoded = self.decoder(denoised)
        stage_done()

        frame = model_output_to_frame(decoded[0].float().permute(1, 2, 0).cpu().numpy())
        stage_done()
        if self.profile_stages:
            self.last_stage_ms = {s: 1000.0 * (b - a) for s, a, b in zip(STAGES, marks, marks[1:])}
        return frame

    def close(self) -> None:
        self.unet = self.encoder = self.decoder = self.prompt_encoder = None
        self.previous_denoised = self.embeds = self.target_embeds = None
        if self.device == "cuda":
            torch.cuda.empty_cache()

"""One-step scheduler math from a diffusers `scheduler_config.json` (numpy tables, no model code).

For a one-step model every Euler/DDPM variant collapses to the same two formulas at a single
timestep t with ᾱ = alphas_cumprod[t]:

    noisy = √ᾱ · x0 + √(1−ᾱ) · noise           (add noise)
    x0    = (noisy − √(1−ᾱ) · ε) / √ᾱ           (epsilon prediction → clean latent)

EulerDiscrete's sigma-space formulation (latents scaled by √(σ²+1)) gives identical numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_sdxs.errors import ConfigError, read_json

_SPACINGS = ("trailing", "leading", "linspace")
_BETA_SCHEDULES = ("scaled_linear", "linear")
_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDPMScheduler", "DDIMScheduler",
               "LCMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler")


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    prediction_type: str = "epsilon"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "SchedulerConfig":
        name = config.get("_class_name", "EulerDiscreteScheduler")
        if name not in _SCHEDULERS:
            raise ConfigError(f"scheduler _class_name: {name!r} is not supported (supported: {', '.join(_SCHEDULERS)})")
        fields = {k: config[k] for k in cls.__dataclass_fields__ if config.get(k) is not None}
        made = cls(**fields)
        if made.beta_schedule not in _BETA_SCHEDULES:
            raise ConfigError(f"scheduler beta_schedule: {made.beta_schedule!r} unsupported ({', '.join(_BETA_SCHEDULES)})")
        if made.timestep_spacing not in _SPACINGS:
            raise ConfigError(f"scheduler timestep_spacing: {made.timestep_spacing!r} unsupported ({', '.join(_SPACINGS)})")
        if made.prediction_type != "epsilon":
            raise ConfigError(f"scheduler prediction_type: {made.prediction_type!r} unsupported (only 'epsilon')")
        if config.get("trained_betas") is not None:
            raise ConfigError("scheduler trained_betas: explicit beta tables are not supported")
        return made

    @classmethod
    def from_file(cls, path: str | Path) -> "SchedulerConfig":
        return cls.from_dict(read_json(Path(path), "a scheduler folder needs scheduler_config.json"))


class OneStepScheduler:
    """ᾱ table, timestep schedules and the two one-step formulas, all in float64 numpy."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        n = config.num_train_timesteps
        if config.beta_schedule == "scaled_linear":
            betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64) ** 2
        else:
            betas = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64)
        # diffusers computes the table in float32; match it so parity holds to the last bit that matters.
        self.alphas_cumprod = np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32).astype(np.float64)

    def timesteps(self, num_steps: int) -> np.ndarray:
        """The integer timesteps of an `num_steps` schedule, noisiest first (diffusers' spacings)."""
        n, spacing = self.config.num_train_timesteps, self.config.timestep_spacing
        if num_steps < 1 or num_steps > n:
            raise ValueError(f"num_steps must be in 1..{n}, got {num_steps}")
        if spacing == "trailing":
            steps = np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1
        elif spacing == "leading":
            steps = (np.arange(num_steps) * (n // num_steps)).round()[::-1].astype(np.int64) + self.config.steps_offset
        else:
            steps = np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)
        return steps

    def strength_timestep(self, strength: float, num_steps: int = 50) -> int:
        """The single timestep img2img runs at for `strength` (as the SDXS camera demo: timesteps[int(50·(1−strength))])."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        schedule = self.timesteps(num_steps)
        return int(schedule[min(int(num_steps * (1.0 - strength)), num_steps - 1)])

    def one_step_timestep(self, strength: float | None = None) -> int:
        """The timestep a one-step call runs at: the 1-step schedule's (SDXS: 999), or the strength's."""
        return int(self.timesteps(1)[0]) if strength is None else self.strength_timestep(strength)

    def coefficients(self, timestep: int) -> tuple[float, float]:
        """(√ᾱ, √(1−ᾱ)) at `timestep`."""
        alpha_bar = float(self.alphas_cumprod[int(timestep)])
        return alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5

    # The two formulas, with Python operators only: they run on mx.array, np.ndarray and torch.Tensor.
    def add_noise(self, x0, noise, timestep: int):
        """√ᾱ·x0 + √(1−ᾱ)·noise."""
        sqrt_alpha, sqrt_one_minus = self.coefficients(timestep)
        return sqrt_alpha * x0 + sqrt_one_minus * noise

    def predict_x0(self, noisy, epsilon, timestep: int):
        """(noisy − √(1−ᾱ)·ε) / √ᾱ."""
        sqrt_alpha, sqrt_one_minus = self.coefficients(timestep)
        return (noisy - sqrt_one_minus * epsilon) / sqrt_alpha

"""One-step scheduler math from a diffusers `scheduler_config.json` (numpy tables, no model code).

At a single timestep t with ᾱ = alphas_cumprod[t], every supported diffusers scheduler's one step is

    noisy = √ᾱ · x0 + √(1−ᾱ) · noise           (img2img: add noise to the image's latent)
    x0    = (noisy − √(1−ᾱ) · ε) / √ᾱ           (epsilon prediction → clean latent)

txt2img starts from pure noise, whose scale depends on the class: Euler's σ-space schedulers
(EulerDiscrete, EulerAncestral) start from `init_noise_sigma`·noise and divide the UNet's input by
√(σ²+1). With trailing or linspace spacing `init_noise_sigma` is σ_t itself, so the UNet sees
√(1−ᾱ)·noise (0.9977·noise at SDXS's t=999), not unit noise; with leading spacing it is √(σ_t²+1), and the
UNet sees unit noise, as with DDPM, DDIM, LCM, PNDM and DPM-Solver. Euler's step to σ=0, x_in·√(σ²+1) − σ·ε,
is the x0 formula above. Settings under which diffusers' one step is not these formulas are refused by
`check_one_step` (see there) rather than approximated.
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
#: The σ-space schedulers: their txt2img start is `init_noise_sigma`·noise, scaled by 1/√(σ²+1) for the UNet.
_SIGMA_SPACE = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
#: Schedulers that pick their own one-step timestep unless the spacing is trailing (LCM: its 50-step origin
#: schedule; DPM-Solver: its own leading/linspace rules), where it is n−1 as here.
_OWN_TIMESTEPS = ("LCMScheduler", "DPMSolverMultistepScheduler")
#: diffusers' default timestep_spacing per class where it is not "leading".
_LINSPACE_BY_DEFAULT = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler")
#: Settings (key, the value that keeps diffusers' one step equal to `predict_x0`, the class's default) per class.
_ONE_STEP_SETTINGS = {
    "EulerDiscreteScheduler": (("use_karras_sigmas", False, False), ("use_exponential_sigmas", False, False),
                               ("use_beta_sigmas", False, False), ("interpolation_type", "linear", "linear"),
                               ("final_sigmas_type", "zero", "zero"), ("timestep_type", "discrete", "discrete")),
    "EulerAncestralDiscreteScheduler": (),
    "DDPMScheduler": (("clip_sample", False, True), ("thresholding", False, False)),
    # DDIM and PNDM step to ᾱ_prev, which is ᾱ[0] (not 1: the clean latent) unless set_alpha_to_one.
    "DDIMScheduler": (("clip_sample", False, True), ("thresholding", False, False), ("set_alpha_to_one", True, True)),
    "PNDMScheduler": (("set_alpha_to_one", True, True),),
    # LCM's boundary condition c_skip = 0.25/((10·t)² + 0.25) is 2.5e-9 at t=999: x0 to float32 precision.
    "LCMScheduler": (("clip_sample", False, False), ("thresholding", False, False), ("timestep_scaling", 10.0, 10.0)),
    "DPMSolverMultistepScheduler": (("use_karras_sigmas", False, False), ("use_exponential_sigmas", False, False),
                                    ("use_beta_sigmas", False, False), ("use_lu_lambdas", False, False),
                                    ("final_sigmas_type", "zero", "zero"), ("thresholding", False, False)),
}


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    timestep_spacing: str = "linspace"  # EulerDiscreteScheduler's default, as the class below
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    class_name: str = "EulerDiscreteScheduler"
    #: Why diffusers' one step with this config is not this module's formulas ("" when it is).
    one_step_mismatch: str = ""

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "SchedulerConfig":
        name = config.get("_class_name", "EulerDiscreteScheduler")
        if name not in _SCHEDULERS:
            raise ConfigError(f"scheduler _class_name: {name!r} is not supported (supported: {', '.join(_SCHEDULERS)})")
        config = {"timestep_spacing": "linspace" if name in _LINSPACE_BY_DEFAULT else "leading", **config}
        fields = {k: config[k] for k in cls.__dataclass_fields__ if config.get(k) is not None}
        made = cls(**fields, class_name=name, one_step_mismatch=_one_step_mismatch(name, config))
        if made.beta_schedule not in _BETA_SCHEDULES:
            raise ConfigError(f"scheduler beta_schedule: {made.beta_schedule!r} unsupported ({', '.join(_BETA_SCHEDULES)})")
        if made.timestep_spacing not in _SPACINGS:
            raise ConfigError(f"scheduler timestep_spacing: {made.timestep_spacing!r} unsupported ({', '.join(_SPACINGS)})")
        if made.prediction_type != "epsilon":
            raise ConfigError(f"scheduler prediction_type: {made.prediction_type!r} unsupported (only 'epsilon')")
        if config.get("trained_betas") is not None:
            raise ConfigError("scheduler trained_betas: explicit beta tables are not supported")
        if config.get("rescale_betas_zero_snr"):
            raise ConfigError("scheduler rescale_betas_zero_snr: zero-terminal-SNR tables are not supported")
        return made

    @classmethod
    def from_file(cls, path: str | Path) -> "SchedulerConfig":
        return cls.from_dict(read_json(Path(path), "a scheduler folder needs scheduler_config.json"))


def _one_step_mismatch(name: str, config: dict[str, Any]) -> str:
    """Why diffusers' one step for scheduler class `name` with `config` would not be `predict_x0` after this
    module's start, or "" (each case measured against diffusers in tests/test_scheduler.py)."""
    if name in _OWN_TIMESTEPS and config["timestep_spacing"] != "trailing":
        return f"{name} picks its own one-step timestep unless timestep_spacing is 'trailing'"
    for key, exact, default in _ONE_STEP_SETTINGS[name]:
        value = config.get(key, default)
        if value != exact:
            return f"{name} with {key}={value!r} does not end its one step at the clean latent ({key}={exact!r} does)"
    return ""


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

    def check_one_step(self) -> None:
        """Refuse a config whose diffusers one-step result differs from `start_noise`/`add_noise` + `predict_x0`:
        txt2img and img2img promise diffusers' numbers (the camera runs its own recipe and needs no such check)."""
        if self.config.one_step_mismatch:
            raise ConfigError(f"scheduler: {self.config.one_step_mismatch}; txt2img and img2img follow diffusers' "
                              "one-step result exactly and cannot with this config")

    def start_scale(self, timestep: int) -> float:
        """The UNet's input for txt2img is this × unit noise: √(1−ᾱ) for a σ-space scheduler whose
        `init_noise_sigma` is σ_t (trailing or linspace spacing), 1 otherwise (see the module docstring)."""
        sigma_space = self.config.class_name in _SIGMA_SPACE and self.config.timestep_spacing != "leading"
        return self.coefficients(timestep)[1] if sigma_space else 1.0

    # The formulas, with Python operators only: they run on mx.array, np.ndarray and torch.Tensor.
    def add_noise(self, x0, noise, timestep: int):
        """√ᾱ·x0 + √(1−ᾱ)·noise."""
        sqrt_alpha, sqrt_one_minus = self.coefficients(timestep)
        return sqrt_alpha * x0 + sqrt_one_minus * noise

    def start_noise(self, noise, timestep: int):
        """txt2img's noisy latent at `timestep` from unit noise (`start_scale`·noise)."""
        return self.start_scale(timestep) * noise

    def predict_x0(self, noisy, epsilon, timestep: int):
        """(noisy − √(1−ᾱ)·ε) / √ᾱ."""
        sqrt_alpha, sqrt_one_minus = self.coefficients(timestep)
        return (noisy - sqrt_one_minus * epsilon) / sqrt_alpha

"""The one-step scheduler math against diffusers' schedulers, run as its pipelines run them: `set_timesteps(1)`,
latents = `init_noise_sigma`·noise (txt2img), the UNet's input from `scale_model_input`, then `step`.

Every class the config loader accepts, at every spacing, on SDXS's own config: where `check_one_step` accepts
the config, our start and x0 equal diffusers' to 1e-6 relative (float32 arithmetic in a different order: a
few ulps at |x| ≈ 15); where it refuses, diffusers' result is shown to differ (so no refusal is needless).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mlx_sdxs.errors import ConfigError
from mlx_sdxs.scheduler import _SCHEDULERS, _SPACINGS, OneStepScheduler, SchedulerConfig
from oracle import SHARED

SDXS_CONFIG = json.loads((SHARED / "configs" / "sdxs-512-0.9" / "scheduler" / "scheduler_config.json").read_text())
RTOL = 1e-6


def diffusers_one_step(config: dict, noise: np.ndarray, eps: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(timestep, the UNet's input, the step's output) of a diffusers txt2img one step on `noise`, with ε = `eps`."""
    import diffusers

    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0]
    latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
    unet_input = scheduler.scale_model_input(latents, t)
    out = scheduler.step(torch.from_numpy(eps), t, latents).prev_sample
    return int(t), unet_input.numpy(), out.numpy()


def ours(config: dict, noise: np.ndarray, eps: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    scheduler = OneStepScheduler(SchedulerConfig.from_dict(config))
    t = scheduler.one_step_timestep()
    noisy = scheduler.start_noise(noise, t)
    return t, noisy, scheduler.predict_x0(noisy, eps, t)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


CASES = [dict(SDXS_CONFIG, _class_name=name, timestep_spacing=spacing) for name in _SCHEDULERS for spacing in _SPACINGS]
CASES += [dict(SDXS_CONFIG, _class_name=name, timestep_spacing="trailing", set_alpha_to_one=True)
          for name in ("DDIMScheduler", "PNDMScheduler")]
CASES += [{k: v for k, v in SDXS_CONFIG.items() if k != "clip_sample"} | {"_class_name": "DDPMScheduler"},
          dict(SDXS_CONFIG, final_sigmas_type="sigma_min")]


@pytest.mark.parametrize("config", CASES, ids=lambda c: f"{c['_class_name']}-{c['timestep_spacing']}-{len(c)}")
def test_one_step_is_diffusers_or_refused(config):
    rng = np.random.default_rng(0)
    noise, eps = (rng.standard_normal((1, 4, 8, 8), dtype=np.float32) for _ in range(2))
    expected = diffusers_one_step(config, noise, eps)
    actual = ours(config, noise, eps)
    scheduler = OneStepScheduler(SchedulerConfig.from_dict(config))
    if not scheduler.config.one_step_mismatch:
        scheduler.check_one_step()
        assert actual[0] == expected[0]
        assert relative(actual[1], expected[1]) <= RTOL and relative(actual[2], expected[2]) <= RTOL
        return
    with pytest.raises(ConfigError, match="follow diffusers' one-step result"):
        scheduler.check_one_step()
    assert actual[0] != expected[0] or relative(actual[2], expected[2]) > 1e-4, "a needless refusal"


def test_sdxs_txt2img_starts_from_sigma_max_not_unit_noise():
    """SDXS's Euler/trailing start: the UNet sees √(1−ᾱ₉₉₉)·noise = 0.9977·noise, measurably not unit noise."""
    scheduler = OneStepScheduler(SchedulerConfig.from_dict(SDXS_CONFIG))
    assert scheduler.one_step_timestep() == 999
    assert scheduler.start_scale(999) == pytest.approx(0.997667, abs=1e-6)
    noise = np.random.default_rng(1).standard_normal((1, 4, 8, 8), dtype=np.float32)
    _, unet_input, _ = diffusers_one_step(SDXS_CONFIG, noise, noise)
    assert relative(noise, unet_input) > 1e-3  # the old unit-noise start is off by 0.23 %


def test_zero_terminal_snr_is_refused():
    with pytest.raises(ConfigError, match="rescale_betas_zero_snr"):
        SchedulerConfig.from_dict(dict(SDXS_CONFIG, rescale_betas_zero_snr=True))

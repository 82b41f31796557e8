"""CoreML: the seed paper's backend (ochyai/streamdiffusion-mac), for comparison on macOS.

Runs the `.mlpackage`s that `python -m convert.coreml` writes with the numpy recipe of
`numpy_recipe`. Prompts are encoded once each with the source checkpoint's CLIP in PyTorch
(transformers), as the seed does; the manifest records where that checkpoint is.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from mlx_sdxs.backends.base import RecipeSettings
from mlx_sdxs.backends.numpy_recipe import (DECODER_INPUT, DECODER_OUTPUT, ENCODER_INPUT, ENCODER_OUTPUT,
                                            UNET_INPUTS, UNET_OUTPUT, NumpyRecipeBackend,
                                            PromptEncoder)
from mlx_sdxs.errors import BackendUnavailable, ConfigError

COMPUTE_UNITS = ("CPU_AND_GPU", "ALL", "CPU_AND_NE", "CPU_ONLY")
_OUTPUTS = {"unet": UNET_OUTPUT, "vae_encoder": ENCODER_OUTPUT, "vae_decoder": DECODER_OUTPUT}


class CoreMLBackend(NumpyRecipeBackend):
    def __init__(self, package_dir: str | Path, settings: RecipeSettings = RecipeSettings(),
                 compute_units: str = "CPU_AND_GPU", prompt: str | None = None,
                 checkpoint_dir: str | Path | None = None, prompt_encoder: PromptEncoder | None = None):
        if platform.system() != "Darwin":
            raise BackendUnavailable("CoreML prediction only exists on macOS; conversion works here: "
                                     "python -m convert.coreml CHECKPOINT OUT --render-size 512")
        if compute_units not in COMPUTE_UNITS:
            raise ConfigError(f"compute_units must be one of {', '.join(COMPUTE_UNITS)}, not {compute_units!r}")
        try:
            import coremltools as ct
        except ImportError:
            raise BackendUnavailable("the coreml backend needs coremltools: pip install 'mlx-sdxs[coreml]'") from None
        super().__init__(package_dir, "coreml", settings, checkpoint_dir, prompt_encoder)

        self.name = f"coreml-{compute_units.lower().replace('_', '-')}"
        units = getattr(ct.ComputeUnit, compute_units)
        self.models = {component: ct.models.MLModel(str(self.export_dir / file), compute_units=units)
                       for component, file in self.manifest.files.items()}
        if prompt is not None:
            self.set_prompt(prompt)

    def _predict(self, component: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.models[component].predict(feeds)[_OUTPUTS[component]], dtype=np.float32)

    def _encode(self, image: np.ndarray) -> np.ndarray:
        return self._predict("vae_encoder", {ENCODER_INPUT: image})

    def _unet(self, sample: np.ndarray, timestep: np.ndarray, embeds: np.ndarray) -> np.ndarray:
        return self._predict("unet", dict(zip(UNET_INPUTS, (sample, timestep, embeds))))

    def _decode(self, latents: np.ndarray) -> np.ndarray:
        return self._predict("vae_decoder", {DECODER_INPUT: latents})

    def close(self) -> None:
        self.models = {}
        self.previous_denoised = self.embeds = self.target_embeds = None

"""CoreML: the SDXS camera demo's own backend (ochyai/streamdiffusion-mac), for comparison on macOS.

Runs the `.mlpackage`s that `mlx-sdxs export coreml` writes as an engine of the shared recipe.
Prompts are encoded once each with the source checkpoint's CLIP in PyTorch, as the demo does.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from mlx_sdxs.backends import COMPUTE_UNITS
from mlx_sdxs.backends.exported import (DECODER_OUTPUT, ENCODER_OUTPUT, UNET_OUTPUT, ExportedEngine,
                                        PromptEncoder)
from mlx_sdxs.errors import BackendUnavailable, ConfigError
from mlx_sdxs.recipe import Recipe, RecipeSettings

_OUTPUTS = {"unet": UNET_OUTPUT, "vae_encoder": ENCODER_OUTPUT, "vae_decoder": DECODER_OUTPUT}
NOT_ON_MACOS = ("CoreML prediction only exists on macOS; conversion works here: "
                "mlx-sdxs export coreml CHECKPOINT OUT --render-size 512")


def check_available() -> None:
    if platform.system() != "Darwin":
        raise BackendUnavailable(NOT_ON_MACOS)


class CoreMLEngine(ExportedEngine):
    def __init__(self, package_dir: str | Path, settings: RecipeSettings, compute_units: str = COMPUTE_UNITS[0],
                 checkpoint_dir: str | Path | None = None, prompt_encoder: PromptEncoder | None = None):
        check_available()
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

    def _run(self, component: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.models[component].predict(feeds)[_OUTPUTS[component]], dtype=np.float32)

    def close(self) -> None:
        self.models = {}


def coreml_stream(package_dir: str | Path, settings: RecipeSettings = RecipeSettings(), prompt: str | None = None,
                  **options) -> Recipe:
    """The camera recipe on CoreML packages (options: compute_units, checkpoint_dir, prompt_encoder)."""
    return Recipe(CoreMLEngine(package_dir, settings, **options), settings, prompt)

"""ONNX Runtime on the CPU: the comparator an informed CPU user would pick over eager PyTorch.

Runs the graphs `python -m convert.onnx` exports (graph optimisation level "all", intra-op
threads = cores) with the numpy recipe of `numpy_recipe`; prompts are encoded once with the
source checkpoint's CLIP (transformers), so embeddings match the torch backend exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mlx_sdxs.backends.base import RecipeSettings
from mlx_sdxs.backends.numpy_recipe import (DECODER_INPUT, ENCODER_INPUT, UNET_INPUTS, NumpyRecipeBackend, PromptEncoder)
from mlx_sdxs.errors import BackendUnavailable


class OnnxBackend(NumpyRecipeBackend):
    name = "onnxruntime-cpu"

    def __init__(self, onnx_dir: str | Path, settings: RecipeSettings = RecipeSettings(), prompt: str | None = None,
                 checkpoint_dir: str | Path | None = None, threads: int | None = None,
                 prompt_encoder: PromptEncoder | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("the onnx backend needs onnxruntime: pip install 'mlx-sdxs[onnx]'") from None
        super().__init__(onnx_dir, "onnx", settings, checkpoint_dir, prompt_encoder)

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        self.sessions = {
            component: ort.InferenceSession(str(self.export_dir / file), options, providers=["CPUExecutionProvider"])
            for component, file in self.manifest.files.items()
        }
        if prompt is not None:
            self.set_prompt(prompt)

    def _run(self, component: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.sessions[component].run(None, feeds)[0]

    def _encode(self, image: np.ndarray) -> np.ndarray:
        return self._run("vae_encoder", {ENCODER_INPUT: image})

    def _unet(self, sample: np.ndarray, timestep: np.ndarray, embeds: np.ndarray) -> np.ndarray:
        return self._run("unet", dict(zip(UNET_INPUTS, (sample, timestep, embeds))))

    def _decode(self, latents: np.ndarray) -> np.ndarray:
        return self._run("vae_decoder", {DECODER_INPUT: latents})

    def close(self) -> None:
        self.sessions = {}
        self.previous_denoised = self.embeds = self.target_embeds = None

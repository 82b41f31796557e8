"""ONNX Runtime on the CPU (or CUDA): the comparator an informed CPU user would pick over eager PyTorch.

Runs the graphs `mlx-sdxs export onnx` writes (graph optimisation level "all", intra-op threads =
cores) as an engine of the shared recipe.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mlx_sdxs.backends.exported import ExportedEngine, PromptEncoder
from mlx_sdxs.errors import BackendUnavailable
from mlx_sdxs.recipe import Recipe, RecipeSettings


class OnnxEngine(ExportedEngine):
    def __init__(self, onnx_dir: str | Path, settings: RecipeSettings, checkpoint_dir: str | Path | None = None,
                 threads: int | None = None, prompt_encoder: PromptEncoder | None = None, provider: str = "cpu"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("the onnx backend needs onnxruntime: pip install 'mlx-sdxs[onnx]'") from None
        providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
        if provider not in providers:
            raise BackendUnavailable(f"onnx provider must be one of {', '.join(providers)}, not {provider!r}")
        if providers[provider][0] not in ort.get_available_providers():
            raise BackendUnavailable(f"ONNX Runtime here has no {providers[provider][0]} "
                                     f"(available: {', '.join(ort.get_available_providers())})")
        super().__init__(onnx_dir, "onnx", settings, checkpoint_dir, prompt_encoder)
        self.name = f"onnxruntime-{provider}"
        self.threads = threads or os.cpu_count() or 1
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        self.sessions = {
            component: ort.InferenceSession(str(self.export_dir / file), options, providers=providers[provider])
            for component, file in self.manifest.files.items()
        }

    def _run(self, component: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.sessions[component].run(None, feeds)[0]

    def close(self) -> None:
        self.sessions = {}


def onnx_stream(onnx_dir: str | Path, settings: RecipeSettings = RecipeSettings(), prompt: str | None = None,
                **options) -> Recipe:
    """The camera recipe on an ONNX export (options: checkpoint_dir, threads, prompt_encoder, provider)."""
    return Recipe(OnnxEngine(onnx_dir, settings, **options), settings, prompt)

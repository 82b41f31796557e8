"""The MLX backend: the camera recipe on `SDXSPipeline.stream`, behind the loop's `Backend` protocol."""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_sdxs.backends.base import RecipeSettings, frame_to_model_input, model_output_to_frame
from mlx_sdxs.pipeline import SDXSPipeline


class MLXBackend:
    """One stream over one pipeline. All MLX work happens on the thread that calls `process`."""

    def __init__(self, pipeline: SDXSPipeline, settings: RecipeSettings, prompt: str):
        self.pipeline, self.settings = pipeline, settings
        self.name = f"mlx-{mx.default_device().type.name}"
        self.render_size = settings.render_size
        self.label = pipeline.label
        self.profile_stages = False
        self.last_stage_ms: dict[str, float] = {}
        self.stream = pipeline.stream(settings, prompt)

    @classmethod
    def from_weights(cls, folder: str | Path, settings: RecipeSettings, prompt: str,
                     dtype: mx.Dtype | None = None) -> "MLXBackend":
        return cls(SDXSPipeline.from_weights(folder, dtype), settings, prompt)

    def set_prompt(self, prompt: str) -> None:
        self.stream.set_prompt(prompt)

    def warmup(self, frames: int = 2) -> None:
        # Throwaway stream: warm-up must not leave feedback state behind in the real one.
        stream, self.stream = self.stream, self.pipeline.stream(self.settings, "")
        blank = np.full((self.render_size, self.render_size, 3), 127, np.uint8)
        try:
            for _ in range(frames):
                self.process(blank)
        finally:
            self.stream = stream

    def process(self, frame_bgr: np.ndarray) -> np.ndarray:
        if self.profile_stages:
            return self._process_profiled(frame_bgr)
        image = mx.array(frame_to_model_input(frame_bgr, self.render_size)[None])
        out = self.stream(image)
        return model_output_to_frame(np.array(out[0].astype(mx.float32)))

    def _process_profiled(self, frame_bgr: np.ndarray) -> np.ndarray:
        """Same work as `process`, evaluated stage by stage so each stage can be timed (bench only)."""
        times = {}
        start = time.perf_counter()
        image = mx.array(frame_to_model_input(frame_bgr, self.render_size)[None])
        mx.eval(image)
        times["preprocess"] = time.perf_counter()
        latent = self.stream.encode(image)
        mx.eval(latent)
        times["encode"] = time.perf_counter()
        denoised = self.stream.denoise(latent)
        mx.eval(denoised)
        times["unet"] = time.perf_counter()
        out = self.pipeline.decode(denoised)
        mx.eval(out)
        times["decode"] = time.perf_counter()
        frame = model_output_to_frame(np.array(out[0].astype(mx.float32)))
        times["postprocess"] = time.perf_counter()
        previous = start
        for stage, stamp in times.items():
            self.last_stage_ms[stage] = (stamp - previous) * 1000.0
            previous = stamp
        return frame

    def close(self) -> None:
        self.stream = None  # drop the feedback latent; the pipeline is shared and stays

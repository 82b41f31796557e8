"""The SDXS camera demo's per-frame recipe, written once for every array library.

    fit the frame to the render size (centre crop to its aspect, resize) → RGB in [-1, 1] → VAE encode
    → latent = (1 − feedback)·latent + feedback·previous_denoised
    → noisy = √ᾱ·latent + √(1−ᾱ)·fixed_noise            (noise drawn once, from the random seed)
    → ε = UNet(noisy, t, prompt_embeds)
    → denoised = (noisy − √(1−ᾱ)·ε)/√ᾱ                  (kept as previous_denoised)
    → VAE decode → [0, 255] uint8

and on a prompt change `embeds += prompt_morph·(target − embeds)` once per frame (morph 0.05, as the
demo). `Recipe` keeps that state and does that arithmetic with Python operators only, so one object
runs unchanged on `mx.array`, `np.ndarray` and `torch.Tensor`: an `Engine` (MLX in `pipeline`,
torch/ONNX/CoreML in `backends/`) supplies just the three model calls, array conversion and a sync.
The latent arithmetic stays in float32 whatever the models compute in (√ᾱ at t=999 is 0.068: the
x0 division amplifies half-precision rounding fifteen-fold, and feedback compounds it).

Blends place the conditioning between two prompts, and the noise between two random seeds, by
spherical interpolation (slerp keeps the norm, hence the noise's variance).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from mlx_sdxs import frames
from mlx_sdxs.errors import ConfigError
from mlx_sdxs.scheduler import OneStepScheduler

STAGES = ("preprocess", "encode", "unet", "decode", "postprocess")
#: The stages the models run ("enc+UNet+dec"); pre/postprocessing is reported apart.
MODEL_STAGES = ("encode", "unet", "decode")
LATENT_SCALE = 8  # VAE spatial downsampling of every SD-family checkpoint


@dataclass(frozen=True)
class RecipeSettings:
    """The recipe's knobs, identical for every backend so their outputs can be compared.

    `render_size` is (width, height); an int means a square. `seed_b`/`seed_blend` place the fixed noise
    on the slerp path from the `seed` noise to the `seed_b` noise."""

    render_size: int | tuple[int, int] = 512
    feedback: float = 0.1
    seed: int = 42
    prompt_morph: float = 0.05
    #: None: the scheduler's one-step timestep (SDXS: t=999); else img2img at this strength (SD-Turbo).
    strength: float | None = None
    seed_b: int | None = None
    seed_blend: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "render_size", frames.as_size(self.render_size))
        for name in ("feedback", "prompt_morph", "seed_blend"):
            check_fraction(getattr(self, name), name)

    @property
    def width(self) -> int:
        return self.render_size[0]

    @property
    def height(self) -> int:
        return self.render_size[1]

    def describe_size(self) -> str:
        return f"{self.width}x{self.height}"


def check_fraction(value: float, name: str, high: float = 1.0) -> float:
    """A blend/feedback/EMA value as a float in [0, high]; anything else is a ConfigError naming it."""
    number = float(value)
    if not 0.0 <= number <= high:
        raise ConfigError(f"{name} must be in [0, {high:g}], got {value}")
    return number


def seed_noise(seed: int, size: tuple[int, int], channels: int) -> np.ndarray:
    """Standard normal NHWC float32 (1, h/8, w/8, C) from a random seed; numpy, so every backend gets the same."""
    width, height = size
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, height // LATENT_SCALE, width // LATENT_SCALE, channels), dtype=np.float32)


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation of two arrays seen as vectors; exactly `a` at t=0 and `b` at t=1."""
    if t <= 0.0:
        return a
    if t >= 1.0:
        return b
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norm_a, norm_b = np.linalg.norm(a64), np.linalg.norm(b64)
    cos = float(np.clip(a64 @ b64 / max(norm_a * norm_b, 1e-30), -1.0, 1.0))
    angle = np.arccos(cos)
    if angle < 1e-4:  # nearly parallel: linear interpolation is exact to first order
        return ((1 - t) * a64 + t * b64).reshape(a.shape).astype(a.dtype)
    out = (np.sin((1 - t) * angle) * a64 + np.sin(t * angle) * b64) / np.sin(angle)
    return out.reshape(a.shape).astype(a.dtype)


def fixed_noise(settings: RecipeSettings, channels: int) -> np.ndarray:
    """The stream's noise: drawn from the random seed `seed`, or the slerp from it to `seed_b`'s at `seed_blend`."""
    noise = seed_noise(settings.seed, settings.render_size, channels)
    if settings.seed_b is None or settings.seed_blend == 0.0:
        return noise
    return slerp(noise, seed_noise(settings.seed_b, settings.render_size, channels), settings.seed_blend)


class Engine(Protocol):
    """What a backend supplies to the recipe. Arrays are the engine's own (any layout); `encode` returns
    UNet-space latents (VAE scaling applied), `decode` takes them; latents and ε are float32."""

    name: str
    scheduler: OneStepScheduler
    latent_channels: int
    #: Shown on every output when set (random-weight models say so).
    label: str | None

    def from_nhwc(self, array: np.ndarray) -> Any: ...

    def to_nhwc(self, array: Any) -> np.ndarray: ...

    def encode(self, image: Any) -> Any: ...

    def predict_noise(self, noisy: Any, timestep: int, embeds: Any) -> Any: ...

    def decode(self, latent: Any) -> Any: ...

    def encode_prompt(self, prompt: str) -> np.ndarray:
        """(1, tokens, D) float32 numpy: embeddings are blended in numpy, then handed to `from_embeds`."""

    def from_embeds(self, embeds: np.ndarray) -> Any: ...

    def sync(self, arrays: Sequence[Any]) -> None:
        """Block until `arrays` are computed (MLX: evaluate; torch CUDA: synchronise)."""

    def check_thread(self) -> None:
        """Raise when called from a thread that may not run this engine's work (MLX streams are per thread)."""

    # Optional: `worker() -> context manager` for the thread that will run all of this engine's work
    # (MLX: a stream that thread owns); engines without per-thread state leave it out.

    def close(self) -> None: ...


@dataclass
class StageClock:
    """Per-stage wall time of one frame. Stages are synchronised (and so timed) only while `profile` is
    on: a sync between stages keeps the next from overlapping the previous. The bench and the camera's
    stage readout use this one mechanism."""

    sync: Callable[[Sequence[Any]], None]
    profile: bool = False
    last_ms: dict[str, float] = field(default_factory=dict)
    _marks: list[float] = field(default_factory=list)

    def start(self) -> None:
        self._marks = [time.perf_counter()]

    def mark(self, *arrays: Any) -> None:
        if self.profile:
            self.sync(arrays)
            self._marks.append(time.perf_counter())

    def finish(self) -> None:
        end = time.perf_counter()
        if self.profile:
            self.last_ms = {s: 1000.0 * (b - a) for s, a, b in zip(STAGES, self._marks, self._marks[1:])}
        else:
            self.last_ms = {"frame": 1000.0 * (end - self._marks[0])}


class Recipe:
    """One camera stream on one engine: the `Backend` the camera loop and the bench drive.

    All engine calls (prompts, warm-up, frames) must come from one thread; the engine checks it."""

    def __init__(self, engine: Engine, settings: RecipeSettings, prompt: str | None = None):
        self.engine, self.settings = engine, settings
        self.name = engine.name
        self.label = engine.label
        self.scheduler = engine.scheduler
        self.timestep = self.scheduler.one_step_timestep(settings.strength)
        self.feedback = settings.feedback
        self.clock = StageClock(engine.sync)
        self._noise = engine.from_nhwc(fixed_noise(settings, engine.latent_channels))
        self.previous: Any = None
        self.embeds: Any = None
        self.target: Any = None
        self._prompts: tuple[str, str | None] = ("", None)
        self.prompt_blend = 0.0
        if prompt is not None:
            self.set_prompt(prompt)

    # --- the Backend protocol of the camera loop ------------------------------------------------
    @property
    def render_size(self) -> tuple[int, int]:
        return self.settings.render_size

    @property
    def profile_stages(self) -> bool:
        return self.clock.profile

    @profile_stages.setter
    def profile_stages(self, value: bool) -> None:
        self.clock.profile = value

    @property
    def last_stage_ms(self) -> dict[str, float]:
        return self.clock.last_ms

    def worker(self) -> AbstractContextManager:
        """The camera loop runs the inference thread inside this (see `Engine.worker`)."""
        worker = getattr(self.engine, "worker", None)
        return worker() if worker is not None else nullcontext()

    def set_prompt(self, prompt: str | None, prompt_b: str | None = None, blend: float | None = None) -> None:
        """Target `prompt` (or the slerp from it to `prompt_b` at `blend`). The first call sets the
        conditioning at once; later ones morph towards it frame by frame. None keeps the current prompt
        (A or B), an empty `prompt_b` drops B."""
        self.engine.check_thread()
        current, current_b = self._prompts
        prompt = current if prompt is None else prompt
        prompt_b = current_b if prompt_b is None else (prompt_b or None)
        self._prompts = (prompt, prompt_b)
        if blend is not None:
            self.prompt_blend = check_fraction(blend, "prompt blend")
        embeds = self.engine.encode_prompt(prompt)
        if prompt_b is not None and self.prompt_blend > 0.0:
            embeds = slerp(embeds, self.engine.encode_prompt(prompt_b), self.prompt_blend)
        target = self.engine.from_embeds(embeds)
        if self.embeds is None:
            self.embeds = target
        self.target = target

    @property
    def prompts(self) -> tuple[str, str | None]:
        """(prompt A, prompt B or None) currently targeted."""
        return self._prompts

    def set_prompt_blend(self, blend: float) -> None:
        """Move the conditioning along the slerp from prompt A to prompt B (morphs like a prompt change)."""
        self.set_prompt(None, None, blend)

    def set_feedback(self, feedback: float) -> None:
        self.feedback = check_fraction(feedback, "feedback")

    def warmup(self, frames_count: int = 2) -> None:
        """Run grey frames so the first real one pays no compile/allocation cost; the stream state
        (feedback latent, conditioning) is restored afterwards."""
        state = (self.previous, self.embeds)
        grey = np.full((self.settings.height, self.settings.width, 3), 127, np.uint8)
        for _ in range(frames_count):
            self.process(grey)
        self.previous, self.embeds = state

    def process(self, frame_bgr: np.ndarray) -> np.ndarray:
        """One camera frame (uint8 BGR, any size and aspect) → one stylised frame (uint8 BGR, render size)."""
        self.engine.check_thread()
        if self.embeds is None:
            raise ConfigError("set_prompt must be called before process")
        engine, clock = self.engine, self.clock
        clock.start()
        image = engine.from_nhwc(frames.to_model_input(frame_bgr, self.settings.render_size))
        clock.mark(image)

        latent = engine.encode(image)
        if self.previous is not None:
            latent = (1.0 - self.feedback) * latent + self.feedback * self.previous
        noisy = self.scheduler.add_noise(latent, self._noise, self.timestep)
        clock.mark(noisy)

        if self.target is not self.embeds:
            self.embeds = self.embeds + self.settings.prompt_morph * (self.target - self.embeds)
        epsilon = engine.predict_noise(noisy, self.timestep, self.embeds)
        self.previous = self.scheduler.predict_x0(noisy, epsilon, self.timestep)
        clock.mark(self.previous)

        decoded = engine.decode(self.previous)
        clock.mark(decoded)
        frame = frames.from_model_output(engine.to_nhwc(decoded))
        clock.mark()
        clock.finish()
        return frame

    def set_seed_blend(self, blend: float) -> None:
        """Move the fixed noise along the slerp from the `seed` noise to the `seed_b` noise."""
        if self.settings.seed_b is None:
            raise ConfigError("a seed blend needs a second random seed (--seed-b)")
        self.settings = replace(self.settings, seed_blend=check_fraction(blend, "seed blend"))
        self._noise = self.engine.from_nhwc(fixed_noise(self.settings, self.engine.latent_channels))

    def close(self) -> None:
        """Drop the stream state and release the engine."""
        self.previous = self.embeds = self.target = None
        self.engine.close()

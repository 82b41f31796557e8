"""The SDXS camera demo's per-frame recipe, written once for every array library.

    fit the frame to the render size (centre crop to its aspect, resize; uint8, on the host)
    → upload → RGB in [-1, 1] → VAE encode
    → latent = (1 − feedback)·latent + feedback·previous_denoised
    → noisy = √ᾱ·latent + √(1−ᾱ)·fixed_noise            (noise drawn once, from the random seed)
    → ε = UNet(noisy, t, prompt_embeds)
    → denoised = (noisy − √(1−ᾱ)·ε)/√ᾱ                  (kept as previous_denoised)
    → VAE decode → [0, 255] uint8 → download

and on a prompt change `embeds += prompt_morph·(target − embeds)` once per frame (morph 0.05, as the
demo) until it has arrived. `denoise` is that frame in Python operators only, so it runs unchanged on
`mx.array`, `np.ndarray` and `torch.Tensor`; `Recipe` keeps the stream's state around it. An `Engine`
(MLX in `pipeline`, torch/ONNX/CoreML in `backends/`) supplies the three model calls, the frame and array
conversions, the conditioning, and start/sync — and may replace `denoise` by a faster equivalent of it
(MLX: the same function `mx.compile`d; torch on CUDA: captured as a CUDA graph).
The latent arithmetic stays in float32 whatever the models compute in (√ᾱ at t=999 is 0.068: the
x0 division amplifies half-precision rounding fifteen-fold, and feedback compounds it).

Blends place the conditioning between two prompts, and the noise between two random seeds, by
spherical interpolation (slerp keeps the norm, hence the noise's variance).
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from mlx_sdxs import frames
from mlx_sdxs.errors import ConfigError
from mlx_sdxs.scheduler import OneStepScheduler

STAGES = ("preprocess", "encode", "unet", "decode", "postprocess")
#: The ControlNet's strength where nothing else says (IDKiro/sdxs's sketch demo's default).
DEFAULT_CONTROL_STRENGTH = 0.8
#: A ControlNet's strength can go past 1 (diffusers takes any scale); past 2 a frame is only the control.
MAX_CONTROL_STRENGTH = 2.0
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
    #: With a ControlNet: how each frame becomes its control image (`frames.CONTROL_MODES`), and its strength.
    control: str = "edges"
    control_strength: float = DEFAULT_CONTROL_STRENGTH

    def __post_init__(self) -> None:
        object.__setattr__(self, "render_size", frames.as_size(self.render_size))
        for name in ("feedback", "prompt_morph", "seed_blend"):
            check_fraction(getattr(self, name), name)
        check_control(self.control, self.control_strength)

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


def check_control(mode: str | None, strength: float | None) -> None:
    """A control mode and strength, either may be None (unchanged); anything else is a ConfigError naming it."""
    if mode is not None and mode not in frames.CONTROL_MODES:
        raise ConfigError(f"control mode must be one of {', '.join(frames.CONTROL_MODES)}, got {mode!r}")
    if strength is not None:
        check_fraction(strength, "control strength", MAX_CONTROL_STRENGTH)


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
    """What a backend supplies to the recipe. Arrays are the engine's own (any layout). Frames cross between
    host and engine as uint8 BGR (H, W, 3) — a quarter of float32's bytes — and become [-1, 1] RGB in the
    engine (`image_in`) and uint8 again there (`image_out`). `encode` returns UNet-space latents (VAE scaling
    applied), `decode` takes them; latents and ε are float32."""

    name: str
    scheduler: OneStepScheduler
    latent_channels: int
    #: Shown on every output when set (random-weight models say so).
    label: str | None
    #: Whether the model has a ControlNet (then every frame brings a control image).
    controlled: bool

    def upload(self, frame: np.ndarray) -> Any:
        """A fitted uint8 BGR (H, W, 3) frame → the engine's array (still uint8 BGR)."""

    def image_in(self, frame: Any) -> Any:
        """uint8 BGR (H, W, 3) → float32 RGB in [-1, 1], the models' layout, batch of one."""

    def image_out(self, image: Any) -> Any:
        """[-1, 1] RGB in the models' layout → uint8 BGR (H, W, 3), rounded like diffusers and clipped."""

    def download(self, frame: Any) -> np.ndarray:
        """The engine's uint8 BGR frame → numpy (waits for it)."""

    def from_nhwc(self, array: np.ndarray) -> Any: ...

    def to_nhwc(self, array: Any) -> np.ndarray: ...

    def encode(self, image: Any) -> Any: ...

    def condition(self, embeds: Any) -> Any:
        """What `predict_noise` takes for these prompt embeddings (MLX: each cross-attention's keys and
        values, computed once per conditioning instead of once per frame; others: `embeds` itself)."""

    def predict_noise(self, noisy: Any, timestep: int, conditioning: Any, control: tuple[Any, Any] | None = None) -> Any:
        """ε; with a ControlNet, `control` is (its RGB image in [0, 1] in the models' layout, its strength)."""

    def decode(self, latent: Any) -> Any: ...

    def encode_prompt(self, prompt: str) -> np.ndarray:
        """(1, tokens, D) float32 numpy: embeddings are blended in numpy, then handed to `from_embeds`."""

    def prompt_truncated(self, prompt: str) -> bool:
        """Whether the text encoder cuts `prompt` off."""

    def from_embeds(self, embeds: np.ndarray) -> Any: ...

    def start(self, arrays: Sequence[Any]) -> None:
        """Begin computing `arrays` without waiting (MLX: `mx.async_eval`; eager engines: nothing), so the
        next frame's host work overlaps this frame's device work."""

    def sync(self, arrays: Sequence[Any]) -> None:
        """Block until `arrays` are computed (MLX: evaluate; torch CUDA: synchronise)."""

    def check_thread(self) -> None:
        """Raise when called from a thread that may not run this engine's work (MLX streams are per thread)."""

    # Optional: `worker() -> context manager` for the thread that will run all of this engine's work
    # (MLX: a stream that thread owns); `frame_step(step) -> step` to replace the step function with a
    # faster equivalent of it (MLX: `mx.compile`d). Engines without them leave them out.

    def close(self) -> None: ...


class HostFrames:
    """The frame conversions of an engine whose arrays live on the host (numpy: the exported graphs' engines,
    the tests' toys): uploads are no-ops, the [-1, 1] conversion is numpy's (`frames`), `from_nhwc` and
    `to_nhwc` give the models' layout, and every call is synchronous."""

    controlled = False

    def upload(self, frame: np.ndarray) -> np.ndarray:
        return frame

    def image_in(self, frame: np.ndarray) -> Any:
        return self.from_nhwc(frames.as_model_input(frame))

    def image_out(self, image: Any) -> np.ndarray:
        return frames.from_model_output(self.to_nhwc(image))

    def download(self, frame: np.ndarray) -> np.ndarray:
        return frame

    def condition(self, embeds: Any) -> Any:
        return embeds

    def start(self, arrays: Sequence[Any]) -> None:
        """Nothing to start: the arrays are computed already."""


class StageClock:
    """Per-stage wall time of one frame. Stages are synchronised (and so timed) only while `profile` is
    on — a sync between stages keeps the next from overlapping the previous, and a compiled step has no
    stages — the bench uses that. Otherwise a frame is timed as `host` (fit, upload, building and queueing
    the step) and `frame` (submit to result), what the camera's readout shows."""

    def __init__(self, sync: Callable[[Sequence[Any]], None]):
        self.sync = sync
        self.profile = False
        self.last_ms: dict[str, float] = {}
        self._marks: list[float] = []

    def start(self) -> float:
        self._marks = [time.perf_counter()]
        return self._marks[0]

    def mark(self, *arrays: Any) -> None:
        if self.profile:
            self.sync(arrays)
            self._marks.append(time.perf_counter())

    def finish(self, started: float, submitted: float, profiled: bool) -> None:
        end = time.perf_counter()
        if profiled:
            self._marks.append(end)
            self.last_ms = {s: 1000.0 * (b - a) for s, a, b in zip(STAGES, self._marks, self._marks[1:])}
        else:
            self.last_ms = {"host": 1000.0 * (submitted - started), "frame": 1000.0 * (end - started)}


def denoise(engine: Engine, timestep: int, frame: Any, previous: Any, noise: Any, feedback: Any,
            conditioning: Any, control: tuple[Any, Any] | None = None,
            clock: StageClock | None = None) -> tuple[Any, Any]:
    """One frame of the recipe on engine arrays: (uint8 BGR output, denoised latent for the next frame's
    feedback). Python operators only, so it runs on every engine, and MLX compiles it whole. `feedback` is
    0 on a stream's first frame (whose `previous` is zeros): (1 − 0)·latent + 0·0 is the latent exactly.
    `control`: (the control image as an uploaded uint8 frame, its strength) for a model with a ControlNet."""
    scheduler = engine.scheduler
    image = engine.image_in(frame)
    if clock is not None:
        clock.mark(image)
    latent = engine.encode(image)
    latent = (1.0 - feedback) * latent + feedback * previous
    noisy = scheduler.add_noise(latent, noise, timestep)
    if clock is not None:
        clock.mark(noisy)
    if control is not None:
        control = ((engine.image_in(control[0]) + 1.0) * 0.5, control[1])  # the ControlNet's [0, 1] RGB
    eps = engine.predict_noise(noisy, timestep, conditioning, control)
    denoised = scheduler.predict_x0(noisy, eps, timestep)
    if clock is not None:
        clock.mark(denoised)
    decoded = engine.decode(denoised)
    if clock is not None:
        clock.mark(decoded)
    return engine.image_out(decoded), denoised


@dataclass
class PendingFrame:
    """A frame submitted to the engine and not yet read back (see `Recipe.submit`)."""

    output: Any
    started: float
    submitted: float
    profiled: bool


#: A prompt morph stops when the distance left is this fraction of where it started: then the conditioning
#: snaps to the target and is no longer recomputed every frame (≈ 270 frames at the demo's 5 %).
MORPH_DONE = 1e-6


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
        self.control_mode, self.control_strength = settings.control, settings.control_strength
        self.clock = StageClock(engine.sync)
        self._noise = engine.from_nhwc(fixed_noise(settings, engine.latent_channels))
        #: The previous frame's denoised latent; zeros (with no feedback) before the first frame.
        self.previous: Any = self._zero_latent()
        self.has_previous = False
        self.embeds: Any = None
        self.target: Any = None
        self._conditioning: Any = None
        self._morph_frames_left = 0
        self._prompts: tuple[str, str | None] = ("", None)
        self.prompt_blend = 0.0
        frame_step = getattr(engine, "frame_step", None)
        self._step = frame_step(denoise) if frame_step is not None else denoise
        if prompt is not None:
            self.set_prompt(prompt)

    def _zero_latent(self) -> Any:
        width, height = self.settings.render_size
        channels = self.engine.latent_channels
        return self.engine.from_nhwc(np.zeros((1, height // LATENT_SCALE, width // LATENT_SCALE, channels), np.float32))

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
        self.target = self.engine.from_embeds(embeds)
        if self.embeds is None:
            self._set_embeds(self.target)
            # Computed now, not left as a graph: MLX graphs belong to the stream of the thread that built
            # them, and the first prompt may be set on another thread than the one that runs the frames.
            self.engine.sync([self._conditioning])
        else:
            self._morph_frames_left = _morph_frames(self.settings.prompt_morph)

    def _set_embeds(self, embeds: Any) -> None:
        self.embeds = embeds
        self._conditioning = self.engine.condition(embeds)

    @property
    def morphing(self) -> bool:
        """Whether the conditioning still moves towards the target (it is recomputed every frame until then)."""
        return self._morph_frames_left > 0

    def _morph_step(self) -> None:
        self._morph_frames_left -= 1
        if self._morph_frames_left == 0:
            self._set_embeds(self.target)
        else:
            self._set_embeds(self.embeds + self.settings.prompt_morph * (self.target - self.embeds))

    def prompt_truncated(self, prompt: str) -> bool:
        """Whether the text encoder cuts `prompt` off (it reads a fixed number of tokens)."""
        return self.engine.prompt_truncated(prompt)

    def set_prompt_blend(self, blend: float) -> None:
        """Move the conditioning along the slerp from prompt A to prompt B (morphs like a prompt change)."""
        self.set_prompt(None, None, blend)

    def set_feedback(self, feedback: float) -> None:
        self.feedback = check_fraction(feedback, "feedback")

    @property
    def controlled(self) -> bool:
        return self.engine.controlled

    def set_control(self, mode: str | None = None, strength: float | None = None) -> None:
        """How frames become the ControlNet's image (`frames.CONTROL_MODES`) and its strength; None keeps one."""
        check_control(mode, strength)
        self.control_mode = mode if mode is not None else self.control_mode
        self.control_strength = strength if strength is not None else self.control_strength

    def warmup(self, frames_count: int = 2) -> None:
        """Run grey frames so the first real one pays no compile/allocation cost; the stream state
        (feedback latent, conditioning) is restored afterwards."""
        state = (self.previous, self.has_previous, self.embeds, self._conditioning, self._morph_frames_left)
        grey = np.full((self.settings.height, self.settings.width, 3), 127, np.uint8)
        for _ in range(frames_count):
            self.process(grey)
        self.previous, self.has_previous, self.embeds, self._conditioning, self._morph_frames_left = state

    def submit(self, frame_bgr: np.ndarray) -> PendingFrame:
        """Start one camera frame (uint8 BGR, any size and aspect) through the models and return without
        waiting for the device: the feedback latent it makes is already the input of the next `submit`,
        so a caller may submit frame N+1 before it `collect`s frame N (one frame in flight)."""
        self.engine.check_thread()
        if self.embeds is None:
            raise ConfigError("set_prompt must be called before process")
        engine, clock = self.engine, self.clock
        profiled = clock.profile
        started = clock.start()
        if self.morphing:
            self._morph_step()
        fitted = frames.fit(frame_bgr, self.settings.render_size)
        control = None
        if engine.controlled:
            control = (engine.upload(frames.control_image(fitted, self.control_mode)), self.control_strength)
        feedback = self.feedback if self.has_previous else 0.0
        step = denoise if profiled else self._step
        output, self.previous = step(engine, self.timestep, engine.upload(fitted), self.previous, self._noise,
                                     feedback, self._conditioning, control, clock if profiled else None)
        self.has_previous = True
        engine.start([output, self.previous])
        return PendingFrame(output, started, time.perf_counter(), profiled)

    def collect(self, pending: PendingFrame) -> np.ndarray:
        """The stylised frame (uint8 BGR, render size) of a submitted one; waits for the device."""
        frame = self.engine.download(pending.output)
        self.clock.finish(pending.started, pending.submitted, pending.profiled)
        return frame

    def process(self, frame_bgr: np.ndarray) -> np.ndarray:
        """One camera frame (uint8 BGR, any size and aspect) → one stylised frame (uint8 BGR, render size)."""
        return self.collect(self.submit(frame_bgr))

    def set_seed_blend(self, blend: float) -> None:
        """Move the fixed noise along the slerp from the `seed` noise to the `seed_b` noise."""
        if self.settings.seed_b is None:
            raise ConfigError("a seed blend needs a second random seed (--seed-b)")
        self.settings = replace(self.settings, seed_blend=check_fraction(blend, "seed blend"))
        self._noise = self.engine.from_nhwc(fixed_noise(self.settings, self.engine.latent_channels))

    def close(self) -> None:
        """Drop the stream state and release the engine."""
        self.previous = self.embeds = self.target = self._conditioning = None
        self.engine.close()


def _morph_frames(morph: float) -> int:
    """Frames until a morph of `morph` per frame has `MORPH_DONE` of its distance left (1 for a jump)."""
    if morph >= 1.0:
        return 1
    if morph <= 0.0:
        return 0
    return max(1, math.ceil(math.log(MORPH_DONE) / math.log(1.0 - morph)))

"""The SDXS camera demo's per-frame recipe, written once for every array library.

    fit the frame to the render size (centre crop to its aspect, resize; uint8, on the host)
    → upload → RGB in [-1, 1] → VAE encode
    → latent = (1 − feedback)·latent + feedback·previous_denoised
    → noisy = √ᾱ·latent + √(1−ᾱ)·fixed_noise            (noise drawn once, from the random seed)
    → ε = UNet(noisy, t, prompt_embeds)
    → denoised = (noisy − √(1−ᾱ)·ε)/√ᾱ                  (kept as previous_denoised)
    → VAE decode → [0, 255] uint8 → download

and on a prompt change `embeds += prompt_morph·(target − embeds)` once per frame (morph 0.05, as the
demo) until it has arrived. `denoise` is that frame, for a batch of streams, in Python operators only, so
it runs unchanged on `mx.array`, `np.ndarray` and `torch.Tensor`; a `Stream` keeps one stream's state
around it, a `StreamGroup` batches several streams' frames, and `Recipe` is one stream alone. An `Engine`
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
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from mlx_sdxs import frames, knobs
from mlx_sdxs.errors import ConfigError
from mlx_sdxs.scheduler import OneStepScheduler

STAGES = ("preprocess", "encode", "unet", "decode", "postprocess")
#: The ControlNet's strength where nothing else says (the knob table's default).
DEFAULT_CONTROL_STRENGTH = knobs.default("control_strength")
#: The stages the models run ("enc+UNet+dec"); pre/postprocessing is reported apart.
MODEL_STAGES = ("encode", "unet", "decode")
LATENT_SCALE = 8  # VAE spatial downsampling of every SD-family checkpoint


@dataclass(frozen=True)
class RecipeSettings:
    """The recipe's knobs, identical for every backend so their outputs can be compared.

    `render_size` is (width, height); an int means a square. `seed_b`/`seed_blend` place the fixed noise
    on the slerp path from the `seed` noise to the `seed_b` noise (without `seed_b` the blend is ignored)."""

    render_size: int | tuple[int, int] = 512
    feedback: float = knobs.default("feedback")
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
        check_fraction(self.prompt_morph, "prompt_morph")
        for name in ("feedback", "seed_blend", "control", "control_strength"):
            knobs.check(name, getattr(self, name))

    @property
    def width(self) -> int:
        return self.render_size[0]

    @property
    def height(self) -> int:
        return self.render_size[1]

    def describe_size(self) -> str:
        return f"{self.width}x{self.height}"


def check_fraction(value: float, name: str) -> float:
    """A setting that is not a live knob (the morph rate) as a float in [0, 1]; else a ConfigError naming it."""
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {value}")
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
    """What a backend supplies to the recipe. Arrays are the engine's own (any layout), a batch of B streams'
    rows along the first axis. Frames cross between host and engine as uint8 BGR (B, H, W, 3) — a quarter of
    float32's bytes — and become [-1, 1] RGB in the engine (`image_in`) and uint8 again there (`image_out`).
    `encode` returns UNet-space latents (VAE scaling applied), `decode` takes them; latents and ε are float32."""

    name: str
    scheduler: OneStepScheduler
    latent_channels: int
    #: Shown on every output when set (random-weight models say so).
    label: str | None
    #: Whether the model has a ControlNet (then every frame brings a control image).
    controlled: bool

    def upload(self, frames: np.ndarray) -> Any:
        """Fitted uint8 BGR frames (B, H, W, 3) → the engine's array (still uint8 BGR)."""

    def image_in(self, frames: Any) -> Any:
        """uint8 BGR (B, H, W, 3) → float32 RGB in [-1, 1], the models' layout."""

    def image_out(self, image: Any) -> Any:
        """[-1, 1] RGB in the models' layout → uint8 BGR (B, H, W, 3), rounded like diffusers and clipped."""

    def download(self, frames: Any) -> np.ndarray:
        """The engine's uint8 BGR frames → numpy (B, H, W, 3) (waits for them)."""

    def from_nhwc(self, array: np.ndarray) -> Any: ...

    def to_nhwc(self, array: Any) -> np.ndarray: ...

    def concat(self, arrays: Sequence[Any]) -> Any:
        """The arrays joined along the batch axis (a batch of streams' latents, noise or embeddings)."""

    def encode(self, image: Any) -> Any: ...

    def condition(self, embeds: Any) -> Any:
        """What `predict_noise` takes for these prompt embeddings (MLX: each cross-attention's keys and
        values, computed once per conditioning instead of once per frame; others: `embeds` itself)."""

    def predict_noise(self, noisy: Any, timestep: int, conditioning: Any, control: tuple[Any, Any] | None = None) -> Any:
        """ε; with a ControlNet, `control` is (its RGB image in [0, 1] in the models' layout, its strength)."""

    def decode(self, latent: Any) -> Any: ...

    def encode_prompt(self, prompt: str) -> tuple[np.ndarray, bool]:
        """(1, tokens, D) float32 numpy (embeddings are blended in numpy, then handed to `from_embeds`) and
        whether the text encoder cut `prompt` off, from one tokenisation."""

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
    # faster equivalent of it (MLX: `mx.compile`d); `batch_sizes` (default `BATCH_SIZES`; an exported graph
    # of batch 1: `(1,)`), `pad_batches` (default False: see `batch_plan`) and `check_size(size)` (refuses a
    # render size the models cannot take). Engines without them leave them out.

    def close(self) -> None: ...


class HostFrames:
    """The frame conversions of an engine whose arrays live on the host (numpy: the exported graphs' engines,
    the tests' toys): uploads are no-ops, the [-1, 1] conversion is numpy's (`frames`), `from_nhwc` and
    `to_nhwc` give the models' layout, and every call is synchronous."""

    controlled = False

    def upload(self, frames: np.ndarray) -> np.ndarray:
        return frames

    def image_in(self, batch: np.ndarray) -> Any:
        return self.from_nhwc(np.concatenate([frames.as_model_input(frame) for frame in batch]))

    def image_out(self, image: Any) -> np.ndarray:
        return np.stack([frames.from_model_output(row) for row in self.to_nhwc(image)])

    def download(self, frames: np.ndarray) -> np.ndarray:
        return frames

    def concat(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays)

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


def one_step(engine: Engine, timestep: int, noisy: Any, conditioning: Any,
             control: tuple[Any, Any] | None = None) -> Any:
    """The one step every path takes (each camera frame, txt2img, img2img): ε from the networks at `timestep`,
    then the clean latent. `control`: (the ControlNet's RGB images in [0, 1] in the models' layout, strength)."""
    eps = engine.predict_noise(noisy, timestep, conditioning, control)
    return engine.scheduler.predict_x0(noisy, eps, timestep)


def denoise(engine: Engine, timestep: int, frame: Any, previous: Any, noise: Any, feedback: Any,
            conditioning: Any, control: tuple[Any, Any] | None = None,
            clock: StageClock | None = None) -> tuple[Any, Any]:
    """One frame of the recipe for a batch of streams, on engine arrays: (uint8 BGR outputs, denoised latents
    for the next frame's feedback). Python operators only, so it runs on every engine, and MLX compiles it
    whole. Every row is one stream's: its frame, previous latent, noise, conditioning, and its `feedback` (and
    control strength) as a (B, 1, 1, 1) array; no operation mixes rows, so a stream's output is what it gets
    alone. `feedback` is 0 on a stream's first frame (whose `previous` is zeros): (1 − 0)·latent + 0·0 is the
    latent exactly. `control`: (the control images as uploaded uint8 frames, their strengths) for a model
    with a ControlNet."""
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
    denoised = one_step(engine, timestep, noisy, conditioning, control)
    if clock is not None:
        clock.mark(denoised)
    decoded = engine.decode(denoised)
    if clock is not None:
        clock.mark(decoded)
    return engine.image_out(decoded), denoised


#: The batch sizes a frame step runs at: B streams' frames go as batches of these sizes, so an engine traces
#: (MLX) or captures (a CUDA graph) at most this many steps per render size and timestep.
BATCH_SIZES = (1, 2, 4, 8)


def batch_plan(count: int, sizes: Sequence[int] = BATCH_SIZES, pad: bool = False) -> list[tuple[int, int]]:
    """How `count` frames of streams that can share a step run: (frames, batch size) per step, in order.

    With `pad` — a device that waits on the host, where a batch of 4 costs about what a batch of 1 does —
    frames beyond the largest size make further steps and the rest rides in the next size up, its spare rows
    computed (copies of the last frame's inputs) and discarded. Without — a compute-bound CPU, where every
    row costs its share — the rest is split into smaller sizes instead (3 = 2 + 1). `sizes` must hold 1."""
    sizes = sorted(sizes)
    plan = []
    while count > 0:
        if pad:
            taken = min(count, sizes[-1])
            plan.append((taken, min(size for size in sizes if size >= taken)))
        else:
            taken = max(size for size in sizes if size <= count)
            plan.append((taken, taken))
        count -= taken
    return plan


@dataclass
class PendingBatch:
    """Frames submitted to the engine and not yet read back (see `StreamGroup.submit`): per step, its streams
    (its first rows) and its uint8 output."""

    steps: list[tuple[list["Stream"], Any]]
    started: float
    submitted: float
    profiled: bool


#: A prompt morph stops when the distance left is this fraction of where it started: then the conditioning
#: snaps to the target and is no longer recomputed every frame (≈ 270 frames at the demo's 5 %).
MORPH_DONE = 1e-6


class Stream:
    """One stream's state on an engine — its settings, fixed noise, feedback latent, prompts and their morph,
    feedback, control — and its knobs. Its frames run in a `StreamGroup` beside other streams' (or alone, as
    a `Recipe`).

    All engine calls (prompts, warm-up, frames) must come from one thread; the engine checks it."""

    def __init__(self, engine: Engine, settings: RecipeSettings, prompt: str | None = None):
        check_size = getattr(engine, "check_size", None)
        if check_size is not None:  # a render size the models cannot take is refused before anything is made
            check_size(settings.render_size)
        self.engine, self.settings = engine, settings
        self.timestep = engine.scheduler.one_step_timestep(settings.strength)
        self.feedback = settings.feedback
        self.control_mode, self.control_strength = settings.control, settings.control_strength
        self.noise = engine.from_nhwc(fixed_noise(settings, engine.latent_channels))
        #: The previous frame's denoised latent; zeros (with no feedback) before the first frame.
        self.previous: Any = self._zero_latent()
        self.has_previous = False
        #: The conditioning's embeddings (a new array at every change: batches recognise them by identity).
        self.embeds: Any = None
        self.target: Any = None
        self._morph_frames_left = 0
        self._prompts: tuple[str, str | None] = ("", None)
        self.prompt_blend = 0.0
        if prompt is not None:
            self.set_prompt(prompt)

    def _zero_latent(self) -> Any:
        width, height = self.settings.render_size
        channels = self.engine.latent_channels
        return self.engine.from_nhwc(np.zeros((1, height // LATENT_SCALE, width // LATENT_SCALE, channels), np.float32))

    @property
    def render_size(self) -> tuple[int, int]:
        return self.settings.render_size

    @property
    def batch_key(self) -> tuple[tuple[int, int], int]:
        """Streams share a step only when this is equal: the render size and the timestep."""
        return self.settings.render_size, self.timestep

    def set_prompt(self, prompt: str | None, prompt_b: str | None = None,
                   blend: float | None = None) -> tuple[str, ...]:
        """Target `prompt` (or the slerp from it to `prompt_b` at `blend`). Before the stream's first frame the
        conditioning is set at once; after it, it morphs towards the target frame by frame. None keeps the current prompt
        (A or B), an empty `prompt_b` drops B. Returns the prompts (A, B) the text encoder cut off."""
        self.engine.check_thread()
        current, current_b = self._prompts
        prompt = current if prompt is None else prompt
        prompt_b = current_b if prompt_b is None else (prompt_b or None)
        self._prompts = (prompt, prompt_b)
        if blend is not None:
            self.prompt_blend = knobs.check("prompt_blend", blend)
        embeds, truncated = self.engine.encode_prompt(prompt)
        cut = (prompt,) if truncated else ()
        if prompt_b is not None:  # encoded even at blend 0, so that its truncation is known when it is set
            embeds_b, truncated_b = self.engine.encode_prompt(prompt_b)
            cut += (prompt_b,) if truncated_b else ()
            if self.prompt_blend > 0.0:
                embeds = slerp(embeds, embeds_b, self.prompt_blend)
        self.target = self.engine.from_embeds(embeds)
        if self.embeds is None or not self.has_previous:  # nothing shown yet: nothing to morph from
            self.embeds, self._morph_frames_left = self.target, 0
        else:
            self._morph_frames_left = _morph_frames(self.settings.prompt_morph)
        return cut

    @property
    def morphing(self) -> bool:
        """Whether the conditioning still moves towards the target (it is recomputed every frame until then)."""
        return self._morph_frames_left > 0

    def _morph_step(self) -> None:
        """One frame's step of the morph (the batch computes the conditioning of the new embeddings)."""
        self._morph_frames_left -= 1
        if self._morph_frames_left == 0:
            self.embeds = self.target
        else:
            self.embeds = self.embeds + self.settings.prompt_morph * (self.target - self.embeds)

    def set_prompt_blend(self, blend: float) -> None:
        """Move the conditioning along the slerp from prompt A to prompt B (morphs like a prompt change)."""
        self.set_prompt(None, None, blend)

    def set_feedback(self, feedback: float) -> None:
        self.feedback = knobs.check("feedback", feedback)

    @property
    def controlled(self) -> bool:
        return self.engine.controlled

    def set_control_mode(self, mode: str) -> None:
        """How frames become the ControlNet's image (`frames.CONTROL_MODES`)."""
        self.control_mode = knobs.check("control", mode)

    def set_control_strength(self, strength: float) -> None:
        self.control_strength = knobs.check("control_strength", strength)

    def set_seed_blend(self, blend: float) -> None:
        """Move the fixed noise along the slerp from the `seed` noise to the `seed_b` noise."""
        if self.settings.seed_b is None:
            raise ConfigError("a seed blend needs a second random seed (seed_b)")
        self.settings = replace(self.settings, seed_blend=knobs.check("seed_blend", blend))
        self.noise = self.engine.from_nhwc(fixed_noise(self.settings, self.engine.latent_channels))

    def _state(self) -> tuple:
        """What a frame changes (the warm-up puts it back)."""
        return self.previous, self.has_previous, self.embeds, self._morph_frames_left

    def _restore(self, state: tuple) -> None:
        self.previous, self.has_previous, self.embeds, self._morph_frames_left = state

    def _drop(self) -> None:
        """Release the stream's arrays (it left its group)."""
        self.previous = self.embeds = self.target = self.noise = None


#: How many recent batch compositions keep their inputs (`_Rows`) for when the same streams come together again.
_ROWS_KEPT = 16


class _Rows:
    """What the last step of the same streams built its batch inputs from, so that an unchanged batch reuses
    them: the streams' noise and embeddings (by identity), the batched noise and conditioning, and the step's
    denoised latents with the rows handed back to each stream (fed back whole when the same streams follow)."""

    def __init__(self) -> None:
        self.noises: tuple = ()
        self.noise: Any = None
        self.embeds: tuple = ()
        self.conditioning: Any = None
        self.previous: tuple = ()
        self.denoised: Any = None
        #: The per-row numbers (feedback, control strength) and their device column, rebuilt only when they change.
        self.numbers: dict[str, tuple[tuple, Any]] = {}


class StreamGroup:
    """Streams on one engine whose frames run together: each `submit` takes the newest frame of any of its
    streams (a stream with no new frame is simply absent and costs nothing) and runs them as batches
    (`batch_plan`) through one step each — streams with another render size or timestep in separate
    batches — one batch in flight like a single stream's; `collect` hands each stream its own result.
    Streams `join` and `leave` at any time, each with its own knobs; a stream's outputs are what it gets
    alone (`denoise`: no operation mixes rows).

    All engine calls (joins, prompts, warm-up, frames) must come from one thread; the engine checks it.
    `pad` overrides the engine's `pad_batches`."""

    def __init__(self, engine: Engine, pad: bool | None = None):
        self.engine = engine
        self.sizes = tuple(getattr(engine, "batch_sizes", BATCH_SIZES))
        self.pad = getattr(engine, "pad_batches", False) if pad is None else pad
        self.clock = StageClock(engine.sync)
        self.streams: list[Stream] = []
        frame_step = getattr(engine, "frame_step", None)
        self._step = frame_step(denoise) if frame_step is not None else denoise
        self._rows: dict[tuple[int, ...], _Rows] = {}

    def join(self, settings: RecipeSettings, prompt: str | None = None) -> Stream:
        """A new stream in this group (its first `set_prompt` may come later, before its first frame)."""
        stream = Stream(self.engine, settings, prompt)
        self.streams.append(stream)
        return stream

    def leave(self, stream: Stream) -> None:
        """`stream` leaves at once and its state is released; a frame of it still in flight is still collected."""
        if stream in self.streams:
            self.streams.remove(stream)
            self._rows = {ids: rows for ids, rows in self._rows.items() if id(stream) not in ids}
            stream._drop()

    def worker(self) -> AbstractContextManager:
        """The camera loop runs the inference thread inside this (see `Engine.worker`)."""
        worker = getattr(self.engine, "worker", None)
        return worker() if worker is not None else nullcontext()

    def warmup(self, frames_count: int = 2, streams: Sequence[Stream] | None = None) -> None:
        """Run grey frames through `streams` (default: every stream) so that the first real batch of as many
        streams pays no compile/allocation cost; each stream's state (feedback latent, conditioning) is restored
        afterwards."""
        streams = list(self.streams if streams is None else streams)
        states = [stream._state() for stream in streams]
        for _ in range(frames_count):
            self.process({stream: np.full((stream.settings.height, stream.settings.width, 3), 127, np.uint8)
                          for stream in streams})
        for stream, state in zip(streams, states):
            stream._restore(state)

    def submit(self, frames_bgr: Mapping[Stream, np.ndarray]) -> PendingBatch:
        """Start one frame (uint8 BGR, any size and aspect) of each stream given, and return without waiting
        for the device: the feedback latents they make are already the inputs of the next `submit`, so a
        caller may submit batch N+1 before it `collect`s batch N (one batch in flight)."""
        self.engine.check_thread()
        for stream in frames_bgr:
            if stream not in self.streams:
                raise ConfigError("this stream is not in the group (it left, or joined another): join it again")
            if stream.embeds is None:
                raise ConfigError("set_prompt must be called before process")
        clock = self.clock
        ready = [stream for stream in self.streams if stream in frames_bgr]  # join order: batches stay alike
        batches = [(streams, batch_plan(len(streams), self.sizes, self.pad)) for streams in _by_key(ready).values()]
        profiled = clock.profile and sum(len(plan) for _, plan in batches) == 1  # stages are timed for one step
        started = clock.start()
        fitted = {}
        for stream in ready:
            if stream.morphing:
                stream._morph_step()
            fitted[stream] = frames.fit(frames_bgr[stream], stream.settings.render_size)
        steps, outputs = [], []
        for streams, plan in batches:
            for count, size in plan:
                taken, streams = streams[:count], streams[count:]
                output, denoised = self._run(taken, size, fitted, clock if profiled else None)
                steps.append((taken, output))
                outputs += [output, denoised]
        self.engine.start(outputs)
        return PendingBatch(steps, started, time.perf_counter(), profiled)

    def _run(self, streams: list[Stream], size: int, fitted: dict[Stream, np.ndarray],
             clock: StageClock | None) -> tuple[Any, Any]:
        """One step of `streams`' frames, padded to `size` rows with copies of the last stream's inputs."""
        engine = self.engine
        spare = size - len(streams)  # padded rows: copies of the last stream's inputs, computed and dropped
        padded = streams + [streams[-1]] * spare
        ids = tuple(id(stream) for stream in padded)
        rows = self._rows.pop(ids, None) or _Rows()
        self._rows[ids] = rows  # the most recent last: streams that come and go keep their batches' inputs
        while len(self._rows) > _ROWS_KEPT:
            del self._rows[next(iter(self._rows))]
        if rows.previous and all(stream.previous is row for stream, row in zip(streams, rows.previous)):
            previous = rows.denoised  # the same streams again: their latents as the last step left them
        else:
            previous = self._join([stream.previous for stream in padded])
        noises = tuple(stream.noise for stream in padded)
        if not _same(noises, rows.noises):
            rows.noises, rows.noise = noises, self._join(list(noises))
        embeds = tuple(stream.embeds for stream in padded)
        if not _same(embeds, rows.embeds):
            rows.embeds, rows.conditioning = embeds, engine.condition(self._join(list(embeds)))
        feedback = self._column(rows, "feedback", [stream.feedback if stream.has_previous else 0.0 for stream in padded])
        images = [fitted[stream] for stream in streams]
        control = None
        if engine.controlled:
            edges = [frames.control_image(image, stream.control_mode) for image, stream in zip(images, streams)]
            control = (engine.upload(np.stack(edges + edges[-1:] * spare)),
                       self._column(rows, "control_strength", [stream.control_strength for stream in padded]))
        step = denoise if clock is not None else self._step
        output, denoised = step(engine, streams[0].timestep, engine.upload(np.stack(images + images[-1:] * spare)),
                                previous, rows.noise, feedback, rows.conditioning, control, clock)
        rows.denoised = denoised
        rows.previous = (denoised,) if size == 1 else tuple(denoised[i: i + 1] for i in range(len(streams)))
        for stream, row in zip(streams, rows.previous):
            stream.previous, stream.has_previous = row, True
        return output, denoised

    def _join(self, arrays: list[Any]) -> Any:
        return arrays[0] if len(arrays) == 1 else self.engine.concat(arrays)

    def _column(self, rows: _Rows, name: str, values: list[float]) -> Any:
        """Per-row numbers as a (B, 1, 1, 1) float32 array (they broadcast over every row's latent), uploaded only
        when they change: a knob turn or a stream's first frame, not every frame."""
        key = tuple(values)
        cached = rows.numbers.get(name)
        if cached is None or cached[0] != key:
            cached = rows.numbers[name] = (key, self.engine.from_nhwc(np.array(values, np.float32).reshape(-1, 1, 1, 1)))
        return cached[1]

    def collect(self, pending: PendingBatch) -> dict[Stream, np.ndarray]:
        """Each submitted stream's stylised frame (uint8 BGR, its render size); waits for the device."""
        results = {}
        for streams, output in pending.steps:
            pixels = self.engine.download(output)
            results.update((stream, pixels[i]) for i, stream in enumerate(streams))
        self.clock.finish(pending.started, pending.submitted, pending.profiled)
        return results

    def process(self, frames_bgr: Mapping[Stream, np.ndarray]) -> dict[Stream, np.ndarray]:
        """`collect(submit(frames_bgr))`."""
        return self.collect(self.submit(frames_bgr))

    @property
    def last_stage_ms(self) -> dict[str, float]:
        """The last batch's times (see `StageClock`): every stream in it waited as long."""
        return self.clock.last_ms

    def close(self) -> None:
        """Every stream leaves; the engine is released."""
        for stream in list(self.streams):
            self.leave(stream)
        self.engine.close()


def _by_key(streams: list[Stream]) -> dict[tuple, list[Stream]]:
    """`streams` by `Stream.batch_key`, in order."""
    groups: dict[tuple, list[Stream]] = {}
    for stream in streams:
        groups.setdefault(stream.batch_key, []).append(stream)
    return groups


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class Recipe(Stream):
    """One camera stream alone on its engine — a `StreamGroup` of one, the same code at batch 1: the
    `Backend` the camera loop and the bench drive."""

    def __init__(self, engine: Engine, settings: RecipeSettings, prompt: str | None = None):
        self.group = StreamGroup(engine)
        super().__init__(engine, settings, prompt)
        self.group.streams.append(self)
        self.name, self.label = engine.name, engine.label

    # --- the Backend protocol of the camera loop ------------------------------------------------
    @property
    def profile_stages(self) -> bool:
        return self.group.clock.profile

    @profile_stages.setter
    def profile_stages(self, value: bool) -> None:
        self.group.clock.profile = value

    @property
    def last_stage_ms(self) -> dict[str, float]:
        return self.group.last_stage_ms

    def worker(self) -> AbstractContextManager:
        return self.group.worker()

    def warmup(self, frames_count: int = 2) -> None:
        """Run grey frames so the first real one pays no compile/allocation cost; the stream state
        (feedback latent, conditioning) is restored afterwards."""
        self.group.warmup(frames_count)

    def submit(self, frame_bgr: np.ndarray) -> PendingBatch:
        """Start one camera frame (uint8 BGR, any size and aspect) through the models and return without
        waiting for the device (one frame in flight: see `StreamGroup.submit`)."""
        return self.group.submit({self: frame_bgr})

    def collect(self, pending: PendingBatch) -> np.ndarray:
        """The stylised frame (uint8 BGR, render size) of a submitted one; waits for the device."""
        return self.group.collect(pending)[self]

    def process(self, frame_bgr: np.ndarray) -> np.ndarray:
        """One camera frame (uint8 BGR, any size and aspect) → one stylised frame (uint8 BGR, render size)."""
        return self.collect(self.submit(frame_bgr))

    def close(self) -> None:
        """Drop the stream state and release the engine."""
        self.group.close()


def _morph_frames(morph: float) -> int:
    """Frames until a morph of `morph` per frame has `MORPH_DONE` of its distance left (1 for a jump)."""
    if morph >= 1.0:
        return 1
    if morph <= 0.0:
        return 0
    return max(1, math.ceil(math.log(MORPH_DONE) / math.log(1.0 - morph)))

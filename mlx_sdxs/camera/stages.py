"""The loop's two worker stages — capture and inference — and what they share: the stop signal with the first
error any stage hit, and the similarity gate. Stages hand over through `LatestSlot`s (newest item wins)."""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlx_sdxs.backends.base import Backend
from mlx_sdxs.camera.slots import LatestSlot
from mlx_sdxs.camera.sources import FrameSource, validate_frame
from mlx_sdxs.camera.state import LoopControl
from mlx_sdxs.errors import SDXSError
from mlx_sdxs.knobs import KNOBS
from mlx_sdxs.tokenizer import MAX_LENGTH

#: After a prompt change the backend morphs over many frames; the similarity filter must not freeze that.
MORPH_FRAMES = 60
THUMBNAIL_SIDE = 32


class WorkerError(SDXSError):
    """A non-SDXS exception in a worker thread, re-raised on the main thread as one readable line."""


@dataclass
class Result:
    """One AI image together with the exact camera frame it was computed from."""

    seq: int  # capture sequence number (1-based) of the source frame
    captured_at: float  # time.perf_counter() when that frame left the source
    camera: np.ndarray
    ai: np.ndarray


def _describe(error: BaseException, thread: str, frame: int) -> BaseException:
    """SDXS errors already read well; anything else becomes one line naming the thread, frame and place."""
    if isinstance(error, SDXSError):
        return error
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    place = f" ({where.filename}:{where.lineno})" if where else ""
    wrapped = WorkerError(f"{thread} thread failed at frame {frame}: {type(error).__name__}: {error}{place}")
    wrapped.__cause__ = error
    return wrapped


class Shutdown:
    """The stop signal every stage watches, and the first error any of them hit."""

    def __init__(self, slots: list[LatestSlot]) -> None:
        self.event = threading.Event()
        self.errors: list[BaseException] = []
        self._slots = slots

    def fail(self, error: BaseException, thread: str, frame: int) -> None:
        self.errors.append(_describe(error, thread, frame))
        self.stop()

    def stop(self) -> None:
        self.event.set()
        for slot in self._slots:
            slot.close()

    @property
    def stopped(self) -> bool:
        return self.event.is_set()


class SimilarityGate:
    """Skip frames nearly identical to the last processed one (StreamDiffusion's similar-image filter).

    Metric: the largest change of any cell of a 32×32 grey thumbnail, in grey levels (0–255); a frame
    whose change is below `threshold` is skipped. The largest cell, not the mean, so a small moving
    object (a hand) still counts as motion. 0 turns the filter off.
    """

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._reference: np.ndarray | None = None
        self._forced = 0

    def force(self, frames: int) -> None:
        """Process the next `frames` frames whatever they look like."""
        self._forced = frames

    def should_skip(self, frame: np.ndarray) -> bool:
        if self.threshold <= 0:
            return False
        import cv2

        small = cv2.resize(frame, (THUMBNAIL_SIDE, THUMBNAIL_SIDE), interpolation=cv2.INTER_AREA)
        thumbnail = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).astype(np.float32)
        if self._forced > 0:
            self._forced -= 1
        elif self._reference is not None and float(np.max(np.abs(thumbnail - self._reference))) < self.threshold:
            return True
        self._reference = thumbnail
        return False


class CaptureStage:
    """Reads the source; each frame goes to the inference slot and to the display's camera slot."""

    def __init__(self, source: FrameSource, frames: LatestSlot, cameras: LatestSlot, control: LoopControl,
                 shutdown: Shutdown):
        self.source, self.frames, self.cameras, self.shutdown = source, frames, cameras, shutdown
        self.stats = control.stats

    def run(self) -> None:
        try:
            while not self.shutdown.stopped:
                frame = self.source.read(self.shutdown.event)
                if frame is None:
                    break
                captured_at = time.perf_counter()
                validate_frame(frame, self.source.name)
                self.stats.captured += 1
                self.frames.put((captured_at, frame))
                self.cameras.put(frame)
        except BaseException as error:  # noqa: BLE001 — carried to the main thread
            self.shutdown.fail(error, "capture", self.stats.captured + 1)
        finally:
            self.frames.close()


def apply_requests(backend: Backend, control: LoopControl, gate: "SimilarityGate | None" = None) -> bool:
    """Hand the requested knobs to where they act (the backend's setter from the knob table, the prompts
    together, the similarity gate), then publish them as the state; True when the conditioning changes (the
    backend morphs towards it)."""
    changes = control.take_requests()
    if not changes:
        return False
    state = control.state
    for name, value in changes.items():
        setter = KNOBS[name].setter
        if setter is not None:
            getattr(backend, setter)(value)
    if gate is not None and "similarity_threshold" in changes:
        gate.threshold = changes["similarity_threshold"]
    prompts_changed = {"prompt", "prompt_b"} & changes.keys()
    note = state.note
    if prompts_changed:
        # The backend resolves what is kept (None) and what is dropped ("" for prompt B); the note names what was cut.
        truncated = backend.set_prompt(changes.get("prompt"), changes.get("prompt_b"), changes.get("prompt_blend"))
        cut = [name for name, text in (("prompt", changes.get("prompt", state.prompt)),
                                       ("prompt B", changes.get("prompt_b", state.prompt_b))) if text in truncated]
        note = (f"{' and '.join(cut)} {'is' if len(cut) == 1 else 'are'} longer than the text encoder's "
                f"{MAX_LENGTH} tokens: the end was cut off") if cut else ""
    elif "prompt_blend" in changes:
        backend.set_prompt_blend(changes["prompt_blend"])
    if "prompt_b" in changes:
        changes["prompt_b"] = changes["prompt_b"] or None
    control.publish(**changes, note=note)
    return bool(prompts_changed) or "prompt_blend" in changes


class InferenceStage:
    """The knobs, the warm-up and every frame through the backend, on one thread that owns the backend's
    device stream (`backend.worker()`); results go to the display's result slot.

    One frame in flight: when the next camera frame is already there, it is submitted before the current
    one is read back, so this thread's host work (fit, upload, building the next frame) overlaps the
    device's; when none is there, the current one is read back at once (no added latency)."""

    def __init__(self, backend: Backend, frames: LatestSlot, results: LatestSlot, control: LoopControl,
                 shutdown: Shutdown, *, warmup: bool):
        self.backend, self.frames, self.results, self.control = backend, frames, results, control
        self.shutdown, self.warmup = shutdown, warmup
        self.gate = SimilarityGate(control.state.similarity_threshold)
        self.ready = threading.Event()
        self.last_seq = 0

    def run(self) -> None:
        self.control.on_request(self.frames.notify)
        try:
            with self.backend.worker():
                self._run()
        except BaseException as error:  # noqa: BLE001 — carried to the main thread
            self.shutdown.fail(error, "inference", self.last_seq)
        finally:
            self.control.on_request(None)
            self.results.close()

    def _run(self) -> None:
        control = self.control
        apply_requests(self.backend, control, self.gate)  # the session's initial knobs, the first prompt among them
        if self.warmup:
            self.backend.warmup()
        self.ready.set()
        in_flight: tuple[int, float, np.ndarray, Any] | None = None
        while not self.shutdown.stopped:
            taken = self.frames.take_newer(self.last_seq, 0.0 if in_flight is not None else None,
                                           wake_if=lambda: control.has_requests)
            if taken is None:
                if in_flight is not None:
                    self._deliver(in_flight)  # no newer frame yet: read this one back now
                    in_flight = None
                elif not control.has_requests or self.frames.closed:
                    break  # the source ended (or the loop stops) and everything is delivered
                if apply_requests(self.backend, control, self.gate):
                    self.gate.force(MORPH_FRAMES)
                continue
            self.last_seq, (captured_at, frame) = taken
            if apply_requests(self.backend, control, self.gate):
                self.gate.force(MORPH_FRAMES)
            if self.gate.should_skip(frame):  # never the first frame: the gate has no reference yet
                control.stats.skipped_similar += 1
                continue
            submitted = (self.last_seq, captured_at, frame, self.backend.submit(frame))
            if in_flight is not None:
                self._deliver(in_flight)
            in_flight = submitted
        if in_flight is not None:
            self._deliver(in_flight)  # the device finishes it either way; the loop may still show it

    def _deliver(self, in_flight: tuple[int, float, np.ndarray, Any]) -> None:
        seq, captured_at, frame, pending = in_flight
        ai = self.backend.collect(pending)
        stats = self.control.stats
        stats.stage_ms = dict(self.backend.last_stage_ms)
        stats.inferred += 1
        stats.ai_rate.tick(time.perf_counter())
        self.control.publish_stats()
        self.results.put(Result(seq, captured_at, frame, ai))

"""The 3-stage camera loop: capture thread → inference thread → presenter on the calling (main) thread.

Stages hand over through `LatestSlot`s that keep only the NEWEST item: a slow stage never works
through a backlog, it skips to the present and the skipped items are counted as stale. This is
the seed system's structure (ochyai/streamdiffusion-mac camera.py) with one stop event, errors
carried back to the main thread, bounded joins, and statistics.

Every backend call (prompt, warm-up, process) happens on the inference thread, so a backend that
owns a device stream (MLX) sees a single thread.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import cv2
import numpy as np

from mlx_sdxs.backends.base import Backend
from mlx_sdxs.camera.sources import FrameSource, validate_frame
from mlx_sdxs.errors import SDXSError

T = TypeVar("T")

#: Latency percentiles are taken over at most this many recent frames (bounded memory in long sessions).
LATENCY_WINDOW = 100_000
#: After a prompt change the backend morphs over many frames; the similarity filter must not freeze that.
MORPH_FRAMES = 60
CAPTURE_JOIN_S = 2.0
#: A real model can be mid-frame for seconds on a CPU; wait for it rather than close it under its feet.
INFERENCE_JOIN_S = 10.0
THUMBNAIL_SIDE = 32


class WorkerError(SDXSError):
    """A non-SDXS exception in a worker thread, re-raised on the main thread as one readable line."""


class LatestSlot(Generic[T]):
    """A one-item hand-over: `put` replaces the item (counting an untaken one as dropped), `take_newer`
    waits for an item newer than the caller's last. `close` means no more puts; what is there can still
    be taken. Single consumer."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._seq = 0
        self._taken_seq = 0
        self._closed = False
        self.dropped = 0

    def put(self, item: T) -> int:
        with self._cond:
            if self._seq > self._taken_seq:
                self.dropped += 1
            self._seq += 1
            self._item = item
            self._cond.notify_all()
            return self._seq

    def take_newer(self, after_seq: int, timeout: float | None = None) -> tuple[int, T] | None:
        """(seq, item) for the newest item with seq > after_seq, or None on timeout or when closed and drained."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._seq > after_seq or self._closed, timeout):
                return None
            if self._seq <= after_seq:
                return None
            self._taken_seq = self._seq
            return self._seq, self._item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


@dataclass
class Result:
    """One displayed unit: the AI image together with the exact camera frame it was computed from."""

    seq: int  # capture sequence number (1-based)
    captured_at: float  # time.perf_counter() when the frame left the source
    camera: np.ndarray
    ai: np.ndarray
    reused: bool  # similarity filter: `ai` is the previous result, the frame was not processed


class RateMeter:
    """Events per second over the last `window` events (thread-safe: written by one thread, read by another)."""

    def __init__(self, window: int = 30):
        self._stamps: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def tick(self, now: float) -> None:
        with self._lock:
            self._stamps.append(now)

    def rate(self, now: float | None = None) -> float:
        """Mean rate of the recent events; 0 once they stopped (e.g. every frame skipped as similar)."""
        with self._lock:
            stamps = list(self._stamps)
        if len(stamps) < 2 or stamps[-1] <= stamps[0]:
            return 0.0
        interval = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        now = time.perf_counter() if now is None else now
        return 0.0 if now - stamps[-1] > max(2.0, 3 * interval) else 1.0 / interval


@dataclass
class LoopStats:
    """Counters of one session. Each counter is written by one thread only."""

    captured: int = 0
    inferred: int = 0
    skipped_similar: int = 0
    dropped_before_inference: int = 0
    dropped_before_display: int = 0
    displayed: int = 0
    elapsed_s: float = 0.0
    stop_reason: str = ""
    latencies_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW), repr=False)
    ai_rate: RateMeter = field(default_factory=RateMeter, repr=False)
    display_rate: RateMeter = field(default_factory=RateMeter, repr=False)

    @property
    def dropped_stale(self) -> int:
        return self.dropped_before_inference + self.dropped_before_display

    def fps(self, count: int) -> float:
        return count / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency_ms(self, percentile: float) -> float:
        if not self.latencies_s:
            return 0.0
        return float(np.percentile(np.fromiter(self.latencies_s, float), percentile) * 1000)

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "captured": self.captured,
            "inferred": self.inferred,
            "skipped_similar": self.skipped_similar,
            "dropped_stale": self.dropped_stale,
            "dropped_before_inference": self.dropped_before_inference,
            "dropped_before_display": self.dropped_before_display,
            "displayed": self.displayed,
            "elapsed_s": round(self.elapsed_s, 3),
            "ai_fps": round(self.fps(self.inferred), 3),
            "display_fps": round(self.fps(self.displayed), 3),
            "latency_ms_p50": round(self.latency_ms(50), 2),
            "latency_ms_p90": round(self.latency_ms(90), 2),
            "latency_ms_p99": round(self.latency_ms(99), 2),
            "stop_reason": self.stop_reason,
        }

    def summary(self) -> str:
        return (f"frames: captured {self.captured} | inferred {self.inferred} | "
                f"skipped (similar) {self.skipped_similar}"
                f" | dropped (stale) {self.dropped_stale} | displayed {self.displayed}\n"
                f"AI {self.fps(self.inferred):.2f} FPS | display {self.fps(self.displayed):.2f} FPS | "
                f"capture→display latency p50 {self.latency_ms(50):.0f} ms, p90 {self.latency_ms(90):.0f} ms, "
                f"p99 {self.latency_ms(99):.0f} ms | {self.elapsed_s:.1f} s ({self.stop_reason})")


class LoopControl:
    """What the presenter (keys) may ask of a running loop; also owns the session's stats, so they
    survive an exception out of `run_loop`."""

    def __init__(self) -> None:
        self.stats = LoopStats()
        self._lock = threading.Lock()
        self._pending_prompt: str | None = None
        self._quit = threading.Event()

    def set_prompt(self, prompt: str) -> None:
        """Applied by the inference thread before its next frame (the backend morphs towards it)."""
        with self._lock:
            self._pending_prompt = prompt

    def take_prompt(self) -> str | None:
        with self._lock:
            prompt, self._pending_prompt = self._pending_prompt, None
            return prompt

    def quit(self) -> None:
        self._quit.set()

    @property
    def quit_requested(self) -> bool:
        return self._quit.is_set()


class Presenter(Protocol):
    """The display stage; runs on the thread that called `run_loop` (OpenCV windows need the main thread on macOS)."""

    def present(self, result: Result, control: LoopControl) -> None: ...

    def idle(self, control: LoopControl) -> None:
        """Called when no new result arrived for a tick: pump window events, read keys."""


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
        small = cv2.resize(frame, (THUMBNAIL_SIDE, THUMBNAIL_SIDE), interpolation=cv2.INTER_AREA)
        thumbnail = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).astype(np.float32)
        if self._forced > 0:
            self._forced -= 1
        elif self._reference is not None and float(np.max(np.abs(thumbnail - self._reference))) < self.threshold:
            return True
        self._reference = thumbnail
        return False


def _describe(error: BaseException, thread: str, frame: int) -> BaseException:
    """SDXS errors already read well; anything else becomes one line naming the thread, frame and place."""
    if isinstance(error, SDXSError):
        return error
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    place = f" ({where.filename}:{where.lineno})" if where else ""
    wrapped = WorkerError(f"{thread} thread failed at frame {frame}: {type(error).__name__}: {error}{place}")
    wrapped.__cause__ = error
    return wrapped


def _wait_for_thread_local_teardown(thread: threading.Thread, timeout: float) -> None:
    """Wait until the OS thread behind a joined `thread` is gone.

    `Thread.join` returns before the thread runs its C++ `thread_local` destructors. MLX keeps its
    `mx.compile` cache per thread and releases Python objects from that destructor; if the program
    is already exiting by then, CPython ends the thread inside the destructor and the process
    aborts ("terminate called without an active exception", seen in 1 of 10 camera runs). Linux
    shows the thread in /proc until it is gone; elsewhere there is nothing to wait on.
    """
    if thread.native_id is None:  # never started
        return
    task = Path(f"/proc/self/task/{thread.native_id}")
    deadline = time.monotonic() + timeout
    while task.exists() and time.monotonic() < deadline:
        time.sleep(0.001)  # the kernel offers no wait on another thread's exit; polls cost ~1 ms once


def run_loop(source: FrameSource, backend: Backend, presenter: Presenter | None = None, *,
             control: LoopControl | None = None, prompt: str | None = None, warmup: bool = False,
             max_frames: int | None = None, duration: float | None = None,
             similarity_threshold: float = 0.0, log=None) -> LoopStats:
    """Run capture → inference → presentation until `max_frames` frames were presented, `duration`
    seconds passed, the source ended, the presenter asked to quit, or a stage failed.

    A worker's exception (and Ctrl-C) stops every stage; after the threads are joined it is raised
    here, on the calling thread. The caller owns `source`, `backend` and the presenter's outputs.
    `duration` counts from the end of warm-up.
    """
    control = control or LoopControl()
    stats = control.stats
    log = log if log is not None else sys.stderr
    stop = threading.Event()
    ready = threading.Event()
    frames: LatestSlot[tuple[float, np.ndarray]] = LatestSlot()
    results: LatestSlot[Result] = LatestSlot()
    errors: list[BaseException] = []

    def fail(error: BaseException, thread: str, frame: int) -> None:
        errors.append(_describe(error, thread, frame))
        stop.set()
        frames.close()
        results.close()

    def capture() -> None:
        try:
            while not stop.is_set():
                frame = source.read(stop)
                if frame is None:
                    break
                captured_at = time.perf_counter()
                validate_frame(frame, source.name)
                stats.captured += 1
                frames.put((captured_at, frame))
        except BaseException as error:  # noqa: BLE001 — carried to the main thread
            fail(error, "capture", stats.captured + 1)
        finally:
            frames.close()

    def infer() -> None:
        gate = SimilarityGate(similarity_threshold)
        previous_ai: np.ndarray | None = None
        last_seq = 0
        try:
            if prompt is not None:
                backend.set_prompt(prompt)
            if warmup:
                backend.warmup()
            ready.set()
            while not stop.is_set():
                taken = frames.take_newer(last_seq)
                if taken is None or stop.is_set():
                    break
                last_seq, (captured_at, frame) = taken
                new_prompt = control.take_prompt()
                if new_prompt is not None:
                    backend.set_prompt(new_prompt)
                    gate.force(MORPH_FRAMES)
                if gate.should_skip(frame):  # never the first frame: the gate has no reference yet
                    stats.skipped_similar += 1
                    ai, reused = previous_ai, True
                else:
                    ai, reused = backend.process(frame), False
                    previous_ai = ai
                    stats.inferred += 1
                    stats.ai_rate.tick(time.perf_counter())
                results.put(Result(last_seq, captured_at, frame, ai, reused))
        except BaseException as error:  # noqa: BLE001 — carried to the main thread
            fail(error, "inference", last_seq)
        finally:
            results.close()

    inference_thread = threading.Thread(target=infer, name="sdxs-inference", daemon=True)
    capture_thread = threading.Thread(target=capture, name="sdxs-capture", daemon=True)
    started = time.perf_counter()
    tick = 0.03 if presenter is not None else 0.25
    try:
        inference_thread.start()
        while not ready.wait(tick):  # warm-up; keep the window responsive meanwhile
            if stop.is_set() or control.quit_requested:
                break
            if presenter is not None:
                presenter.idle(control)
        if ready.is_set() and not stop.is_set() and not control.quit_requested:
            capture_thread.start()
        started = time.perf_counter()
        deadline = started + duration if duration is not None else None
        last_seq = 0
        while not stop.is_set():
            if control.quit_requested:
                stats.stop_reason = "quit"
                break
            timeout = tick if deadline is None else max(0.0, min(tick, deadline - time.perf_counter()))
            taken = results.take_newer(last_seq, timeout)
            if taken is None:
                if stop.is_set():
                    break
                if results.closed:
                    stats.stop_reason = "source ended"
                    break
                if deadline is not None and time.perf_counter() >= deadline:
                    stats.stop_reason = "duration"
                    break
                if presenter is not None:
                    presenter.idle(control)
                continue
            last_seq, result = taken
            if presenter is not None:
                presenter.present(result, control)
            now = time.perf_counter()
            stats.displayed += 1
            stats.display_rate.tick(now)
            stats.latencies_s.append(now - result.captured_at)
            if max_frames is not None and stats.displayed >= max_frames:
                stats.stop_reason = "max frames"
                break
            if deadline is not None and now >= deadline:
                stats.stop_reason = "duration"
                break
    except KeyboardInterrupt:
        stats.stop_reason = "interrupted"
        raise
    except BaseException:
        stats.stop_reason = "error"
        raise
    finally:
        stop.set()
        frames.close()
        results.close()
        for thread, limit in ((capture_thread, CAPTURE_JOIN_S), (inference_thread, INFERENCE_JOIN_S)):
            if thread.is_alive():
                thread.join(limit)
            if thread.is_alive():
                print(f"mlx-sdxs: the {thread.name} thread did not stop within {limit:.0f} s", file=log)
        if not inference_thread.is_alive():
            _wait_for_thread_local_teardown(inference_thread, INFERENCE_JOIN_S)
        stats.elapsed_s = time.perf_counter() - started
        stats.dropped_before_inference = frames.dropped
        stats.dropped_before_display = results.dropped
    if errors:
        stats.stop_reason = "error"
        raise errors[0]
    return stats

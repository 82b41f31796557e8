"""The 3-stage camera loop: capture thread → inference thread → display on the calling (main) thread.

Stages hand over through `LatestSlot`s that keep only the NEWEST item: a slow stage never works
through a backlog, it skips to the present and the skipped items are counted as stale. The display
ticks at the capture rate: every new camera frame is composed with the newest AI result, so the
camera half, the blend and the EMA stay live while the model works on the next frame.

Shutdown, in order: any stage sets the stop event (or the source ends, or the presenter quits);
the slots close so no stage waits; capture and inference threads are joined (bounded); a worker's
exception is re-raised on the calling thread as one readable line.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Generic, Protocol, TextIO, TypeVar

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
#: Without a camera frame for this long, a new AI result is displayed on its own tick.
STALLED_SOURCE_S = 0.1


class WorkerError(SDXSError):
    """A non-SDXS exception in a worker thread, re-raised on the main thread as one readable line."""


class LatestSlot(Generic[T]):
    """A one-item hand-over: `put` replaces the item (counting an untaken one as dropped), `take_newer`
    waits for an item newer than the caller's last. `close` means no more puts; what is there can still
    be taken. Single consumer. Slots may share one `threading.Condition`, so a consumer can wait on several."""

    def __init__(self, condition: threading.Condition | None = None) -> None:
        self._cond = condition or threading.Condition()
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

    @property
    def seq(self) -> int:
        return self._seq

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


@dataclass
class Result:
    """One AI image together with the exact camera frame it was computed from."""

    seq: int  # capture sequence number (1-based) of the source frame
    captured_at: float  # time.perf_counter() when that frame left the source
    camera: np.ndarray
    ai: np.ndarray


@dataclass
class Tick:
    """What the display shows once: the newest camera frame and the newest AI result."""

    camera: np.ndarray
    camera_seq: int
    result: Result
    #: True on the first tick that shows `result`.
    new_result: bool


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
    #: AI results replaced by a newer one before any display tick showed them.
    dropped_before_display: int = 0
    displayed: int = 0
    results_displayed: int = 0
    elapsed_s: float = 0.0
    stop_reason: str = ""
    #: The backend's timing of its newest frame (ms; the recipe's: host work, submit to result).
    stage_ms: dict[str, float] = field(default_factory=dict)
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
            "results_displayed": self.results_displayed,
            "elapsed_s": round(self.elapsed_s, 3),
            "ai_fps": round(self.fps(self.inferred), 3),
            "display_fps": round(self.fps(self.displayed), 3),
            "latency_ms_p50": round(self.latency_ms(50), 2),
            "latency_ms_p90": round(self.latency_ms(90), 2),
            "latency_ms_p99": round(self.latency_ms(99), 2),
            "stop_reason": self.stop_reason,
        }

    def live(self) -> dict[str, float | int]:
        """The figures a status line or the studio page shows while the loop runs."""
        return {"ai_fps": round(self.ai_rate.rate(), 2), "display_fps": round(self.display_rate.rate(), 2),
                "latency_ms": round(self.latencies_s[-1] * 1000, 1) if self.latencies_s else 0.0,
                "dropped": self.dropped_before_inference, "inferred": self.inferred, "displayed": self.displayed,
                "stage_ms": {k: round(v, 1) for k, v in self.stage_ms.items()}}

    def summary(self) -> str:
        return (f"frames: captured {self.captured} | inferred {self.inferred} | "
                f"skipped (similar) {self.skipped_similar}"
                f" | dropped (stale) {self.dropped_stale} | displayed {self.displayed}\n"
                f"AI {self.fps(self.inferred):.2f} FPS | display {self.fps(self.displayed):.2f} FPS | "
                f"capture→display latency p50 {self.latency_ms(50):.0f} ms, p90 {self.latency_ms(90):.0f} ms, "
                f"p99 {self.latency_ms(99):.0f} ms | {self.elapsed_s:.1f} s ({self.stop_reason})")


class LoopControl:
    """What the display (keys) or the studio page may ask of a running loop; also owns the session's stats,
    so they survive an exception out of `run_loop`. Requests are applied by the inference thread before
    its next frame, newest value per knob."""

    KNOBS = ("prompt", "prompt_b", "prompt_blend", "feedback", "seed_blend")

    def __init__(self) -> None:
        self.stats = LoopStats()
        self._lock = threading.Lock()
        self._pending: dict[str, object] = {}
        self._quit = threading.Event()

    def request(self, **changes: object) -> None:
        """Queue knob changes (prompt, prompt_b, prompt_blend, feedback, seed_blend) for the next frame."""
        unknown = set(changes) - set(self.KNOBS)
        if unknown:
            raise ValueError(f"unknown loop setting(s): {', '.join(sorted(unknown))}")
        with self._lock:
            self._pending.update(changes)

    def set_prompt(self, prompt: str) -> None:
        self.request(prompt=prompt)

    def take_requests(self) -> dict[str, object]:
        with self._lock:
            pending, self._pending = self._pending, {}
            return pending

    def quit(self) -> None:
        self._quit.set()

    @property
    def quit_requested(self) -> bool:
        return self._quit.is_set()


class Presenter(Protocol):
    """The display stage; runs on the thread that called `run_loop` (OpenCV windows need the main thread on macOS).
    A presenter may say `draws = False` (nothing to draw now): it is then called once per new result only."""

    def present(self, tick: Tick, control: LoopControl) -> None: ...

    def idle(self, control: LoopControl) -> None:
        """Called when nothing new arrived for a tick: pump window events, read keys."""


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


class CaptureStage:
    """Reads the source; each frame goes to the inference slot and to the display's camera slot."""

    def __init__(self, source: FrameSource, frames: LatestSlot, cameras: LatestSlot, stats: LoopStats,
                 shutdown: Shutdown):
        self.source, self.frames, self.cameras, self.stats, self.shutdown = source, frames, cameras, stats, shutdown

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


def apply_requests(backend: Backend, requests: dict[str, object]) -> bool:
    """Hand queued knob changes to the backend; True when the conditioning changes (it morphs)."""
    if "feedback" in requests:
        backend.set_feedback(requests["feedback"])
    if "seed_blend" in requests:
        backend.set_seed_blend(requests["seed_blend"])
    prompt_keys = {"prompt", "prompt_b", "prompt_blend"} & requests.keys()
    if not prompt_keys:
        return False
    if prompt_keys == {"prompt_blend"}:
        backend.set_prompt_blend(requests["prompt_blend"])
    else:
        backend.set_prompt(requests.get("prompt"), requests.get("prompt_b"), requests.get("prompt_blend"))
    return True


class InferenceStage:
    """Prompt, warm-up and every frame through the backend, on one thread that owns the backend's
    device stream (`backend.worker()`); results go to the display's result slot.

    One frame in flight: when the next camera frame is already there, it is submitted before the current
    one is read back, so this thread's host work (fit, upload, building the next frame) overlaps the
    device's; when none is there, the current one is read back at once (no added latency)."""

    def __init__(self, backend: Backend, frames: LatestSlot, results: LatestSlot, control: LoopControl,
                 shutdown: Shutdown, *, prompt: str | None, warmup: bool, similarity_threshold: float,
                 prompt_b: str | None = None, prompt_blend: float | None = None):
        self.backend, self.frames, self.results, self.control = backend, frames, results, control
        self.shutdown, self.prompt, self.warmup = shutdown, prompt, warmup
        self.prompt_b, self.prompt_blend = prompt_b, prompt_blend
        self.gate = SimilarityGate(similarity_threshold)
        self.ready = threading.Event()
        self.last_seq = 0

    def run(self) -> None:
        try:
            with self.backend.worker():
                self._run()
        except BaseException as error:  # noqa: BLE001 — carried to the main thread
            self.shutdown.fail(error, "inference", self.last_seq)
        finally:
            self.results.close()

    def _run(self) -> None:
        backend = self.backend
        if self.prompt is not None:
            if self.prompt_b is None:
                backend.set_prompt(self.prompt)
            else:
                backend.set_prompt(self.prompt, self.prompt_b, self.prompt_blend)
        if self.warmup:
            backend.warmup()
        self.ready.set()
        in_flight: tuple[int, float, np.ndarray, object] | None = None
        while not self.shutdown.stopped:
            taken = self.frames.take_newer(self.last_seq, 0.0 if in_flight is not None else None)
            if taken is None:
                if in_flight is None:
                    break  # the source ended (or the loop stops) and everything is delivered
                self._deliver(in_flight)  # no newer frame yet: read this one back now
                in_flight = None
                continue
            self.last_seq, (captured_at, frame) = taken
            if apply_requests(backend, self.control.take_requests()):
                self.gate.force(MORPH_FRAMES)
            if self.gate.should_skip(frame):  # never the first frame: the gate has no reference yet
                self.control.stats.skipped_similar += 1
                continue
            submitted = (self.last_seq, captured_at, frame, backend.submit(frame))
            if in_flight is not None:
                self._deliver(in_flight)
            in_flight = submitted
        if in_flight is not None:
            self._deliver(in_flight)  # the device finishes it either way; the loop may still show it

    def _deliver(self, in_flight: tuple[int, float, np.ndarray, object]) -> None:
        seq, captured_at, frame, pending = in_flight
        ai = self.backend.collect(pending)
        stats = self.control.stats
        stats.stage_ms = dict(self.backend.last_stage_ms)
        stats.inferred += 1
        stats.ai_rate.tick(time.perf_counter())
        self.results.put(Result(seq, captured_at, frame, ai))


class DisplayLoop:
    """The main-thread stage: one tick per new camera frame (or new result), until a stop condition. A
    presenter that draws nothing (`draws` False: headless, no outputs) ticks per new result only: nothing
    wakes at the camera's rate to compose frames no one sees."""

    def __init__(self, cameras: LatestSlot, results: LatestSlot, condition: threading.Condition,
                 presenter: Presenter | None, control: LoopControl, shutdown: Shutdown, *,
                 max_frames: int | None, max_results: int | None, duration: float | None):
        self.cameras, self.results, self.condition = cameras, results, condition
        self.presenter, self.control, self.shutdown = presenter, control, shutdown
        self.max_frames, self.max_results, self.duration = max_frames, max_results, duration
        self.tick_s = 0.03 if presenter is not None else 0.25

    def idle(self) -> None:
        if self.presenter is not None:
            self.presenter.idle(self.control)

    def run(self) -> str:
        """Returns the stop reason."""
        deadline = time.perf_counter() + self.duration if self.duration is not None else None
        camera_seq = result_seq = 0
        camera: np.ndarray | None = None
        result: Result | None = None
        last_camera_at = time.perf_counter()
        while True:
            if self.control.quit_requested:
                return "quit"
            if self.shutdown.stopped:
                return "error"
            now = time.perf_counter()
            if deadline is not None and now >= deadline:
                return "duration"
            timeout = self.tick_s if deadline is None else max(0.0, min(self.tick_s, deadline - now))
            if not self._follows_camera():
                with self.condition:
                    self.condition.wait_for(lambda: self.results.seq > result_seq or self.results.closed, timeout)
                taken_result = self.results.take_newer(result_seq, 0)
                if taken_result is None:
                    if self.results.closed and self.results.seq <= result_seq:
                        return "source ended"
                    self.idle()
                    continue
                result_seq, result = taken_result
                reason = self._show(Tick(result.camera, result.seq, result, True))
                if reason:
                    return reason
                continue
            # Ticks follow the camera. A new AI result waits for the next camera frame (at most one frame
            # period), unless the source stalls or has ended: then it is shown on its own.
            stall_at = last_camera_at + STALLED_SOURCE_S
            result_due = self.results.seq > result_seq and (now >= stall_at or self.results.closed)
            with self.condition:  # both slots notify it
                if self.results.seq > result_seq and not result_due:
                    self.condition.wait_for(lambda: self.cameras.seq > camera_seq or self.results.closed,
                                            max(0.0, min(timeout, stall_at - now)))
                elif not result_due:
                    self.condition.wait_for(lambda: self.cameras.seq > camera_seq or self.results.seq > result_seq
                                            or self.results.closed, timeout)
            taken_camera = self.cameras.take_newer(camera_seq, 0)
            if taken_camera is not None:
                camera_seq, camera = taken_camera
                last_camera_at = time.perf_counter()
            results_over = self.results.closed
            stalled = time.perf_counter() >= last_camera_at + STALLED_SOURCE_S
            taken_result = self.results.take_newer(result_seq, 0) \
                if taken_camera is not None or results_over or stalled else None
            new_result = taken_result is not None
            if new_result:
                result_seq, result = taken_result
            if result is None or not (new_result or taken_camera is not None):
                if results_over and self.results.seq <= result_seq:
                    return "source ended"
                self.idle()
                continue
            reason = self._show(Tick(camera if camera is not None else result.camera, camera_seq, result, new_result))
            if reason:
                return reason

    def _follows_camera(self) -> bool:
        return self.presenter is not None and getattr(self.presenter, "draws", True)

    def _show(self, tick: Tick) -> str:
        """Present one tick and count it; the stop reason when a frame or result limit is reached."""
        stats = self.control.stats
        if self.presenter is not None:
            self.presenter.present(tick, self.control)
        now = time.perf_counter()
        stats.displayed += 1
        stats.display_rate.tick(now)
        if tick.new_result:
            stats.results_displayed += 1
            stats.latencies_s.append(now - tick.result.captured_at)
        if self.max_frames is not None and stats.displayed >= self.max_frames:
            return "max frames"
        if self.max_results is not None and stats.results_displayed >= self.max_results:
            return "max results"
        return ""


def run_loop(source: FrameSource, backend: Backend, presenter: Presenter | None = None, *,
             control: LoopControl | None = None, prompt: str | None = None, warmup: bool = False,
             prompt_b: str | None = None, prompt_blend: float | None = None,
             max_frames: int | None = None, max_results: int | None = None, duration: float | None = None,
             similarity_threshold: float = 0.0, on_warmup: Callable[[float], None] | None = None,
             on_ready: Callable[[float], None] | None = None, log: TextIO | None = None) -> LoopStats:
    """Run capture → inference → display until `max_frames` display ticks, `max_results` new AI results
    shown, `duration` seconds (counted from the end of warm-up), the source ended, the presenter quit,
    or a stage failed. `on_warmup(elapsed_s)` is called every few seconds while the backend warms up, and
    `on_ready(elapsed_s)` once when it is done.

    A worker's exception (and Ctrl-C / SIGTERM raised on this thread) stops every stage; after the
    threads are joined it is raised here. The caller owns `source`, `backend` and the presenter's outputs.
    """
    control = control or LoopControl()
    stats = control.stats
    log = log if log is not None else sys.stderr
    condition = threading.Condition()
    frames: LatestSlot[tuple[float, np.ndarray]] = LatestSlot()
    cameras: LatestSlot[np.ndarray] = LatestSlot(condition)
    results: LatestSlot[Result] = LatestSlot(condition)
    shutdown = Shutdown([frames, cameras, results])
    capture = CaptureStage(source, frames, cameras, stats, shutdown)
    inference = InferenceStage(backend, frames, results, control, shutdown, prompt=prompt, warmup=warmup,
                               similarity_threshold=similarity_threshold, prompt_b=prompt_b,
                               prompt_blend=prompt_blend)
    display = DisplayLoop(cameras, results, condition, presenter, control, shutdown,
                          max_frames=max_frames, max_results=max_results, duration=duration)
    inference_thread = threading.Thread(target=inference.run, name="sdxs-inference", daemon=True)
    capture_thread = threading.Thread(target=capture.run, name="sdxs-capture", daemon=True)
    started = time.perf_counter()
    try:
        inference_thread.start()
        _wait_for_warmup(inference, shutdown, control, display, on_warmup)
        if inference.ready.is_set() and not shutdown.stopped and not control.quit_requested:
            if on_ready is not None:
                on_ready(time.perf_counter() - started)
            capture_thread.start()
            started = time.perf_counter()
            stats.stop_reason = display.run()
        else:
            stats.stop_reason = "quit" if control.quit_requested else "error"
    except KeyboardInterrupt:
        stats.stop_reason = "interrupted"
        raise
    except BaseException:
        stats.stop_reason = "error"
        raise
    finally:
        shutdown.stop()
        for thread, limit in ((capture_thread, CAPTURE_JOIN_S), (inference_thread, INFERENCE_JOIN_S)):
            if thread.is_alive():
                thread.join(limit)
            if thread.is_alive():
                print(f"mlx-sdxs: the {thread.name} thread did not stop within {limit:.0f} s", file=log)
        stats.elapsed_s = time.perf_counter() - started
        stats.dropped_before_inference = frames.dropped
        stats.dropped_before_display = results.dropped
    if shutdown.errors:
        stats.stop_reason = "error"
        raise shutdown.errors[0]
    return stats


def _wait_for_warmup(inference: InferenceStage, shutdown: Shutdown, control: LoopControl, display: DisplayLoop,
                     on_warmup: Callable[[float], None] | None, report_every_s: float = 5.0) -> None:
    """Keep the window responsive (and say what is happening) until the backend's first frames are done."""
    start = time.perf_counter()
    next_report = start + report_every_s
    while not inference.ready.wait(display.tick_s):
        if shutdown.stopped or control.quit_requested:
            return
        display.idle()
        now = time.perf_counter()
        if on_warmup is not None and now >= next_report:
            on_warmup(now - start)
            next_report = now + report_every_s

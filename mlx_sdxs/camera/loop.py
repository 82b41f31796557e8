"""The 3-stage camera loop: capture thread → inference thread → display on the calling (main) thread.

Stages hand over through `LatestSlot`s that keep only the NEWEST item: a slow stage never works
through a backlog, it skips to the present and the skipped items are counted as stale. The display
ticks at the capture rate: every new camera frame is composed with the newest AI result, so the
camera half, the blend and the EMA stay live while the model works on the next frame.

Shutdown, in order: any stage sets the stop event (or the source ends, or the presenter quits);
the slots close so no stage waits; capture and inference threads are joined (bounded); a worker's
exception is re-raised on the calling thread as one readable line. A worker that is still inside a
model call when its join limit passes is left behind and named by `stuck_workers`: a program exits
without waiting for it (see `mlx_sdxs.cli`).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, TextIO

import numpy as np

from mlx_sdxs.backends.base import Backend
from mlx_sdxs.camera.slots import LatestSlot
from mlx_sdxs.camera.sources import FrameSource
from mlx_sdxs.camera.stages import CaptureStage, InferenceStage, Result, Shutdown
from mlx_sdxs.camera.state import LoopControl
from mlx_sdxs.camera.stats import LoopStats

CAPTURE_JOIN_S = 2.0
#: A real model can be mid-frame for seconds on a CPU; wait for it rather than close it under its feet.
INFERENCE_JOIN_S = 10.0
#: Without a camera frame for this long, a new AI result is displayed on its own tick.
STALLED_SOURCE_S = 0.1
CAPTURE_THREAD, INFERENCE_THREAD = "sdxs-capture", "sdxs-inference"


@dataclass
class Tick:
    """What the display shows once: the newest camera frame and the newest AI result."""

    camera: np.ndarray
    camera_seq: int
    result: Result
    #: True on the first tick that shows `result`.
    new_result: bool


class Presenter(Protocol):
    """The display stage; runs on the thread that called `run_loop` (OpenCV windows need the main thread on macOS).
    A presenter may say `draws = False` (nothing to draw now): it is then called once per new result only."""

    def present(self, tick: Tick, control: LoopControl) -> None: ...

    def idle(self, control: LoopControl) -> None:
        """Called when nothing new arrived for a tick: pump window events, read keys."""


class DisplayLoop:
    """The main-thread stage: one tick per new camera frame (or new result), until a stop condition. A
    presenter that draws nothing (`draws` False: headless, no outputs) ticks per new result only: nothing
    wakes at the camera's rate to compose frames no one sees."""

    def __init__(self, cameras: LatestSlot, results: LatestSlot, presenter: Presenter | None, control: LoopControl,
                 shutdown: Shutdown, *, max_frames: int | None, max_results: int | None, duration: float | None):
        self.cameras, self.results = cameras, results
        self.presenter, self.control, self.shutdown = presenter, control, shutdown
        self.max_frames, self.max_results, self.duration = max_frames, max_results, duration
        self.tick_s = 0.03 if presenter is not None else 0.25

    def idle(self) -> None:
        self.control.publish_stats()
        if self.presenter is not None:
            self.presenter.idle(self.control)

    def run(self) -> str:
        """Returns the stop reason."""
        deadline = time.perf_counter() + self.duration if self.duration is not None else None
        self._camera_seq = self._result_seq = 0
        self._camera: np.ndarray | None = None
        self._result: Result | None = None
        self._last_camera_at = time.perf_counter()
        while True:
            if self.control.quit_requested:
                return "quit"
            if self.shutdown.stopped:
                return "error"
            now = time.perf_counter()
            if deadline is not None and now >= deadline:
                return "duration"
            timeout = self.tick_s if deadline is None else max(0.0, min(self.tick_s, deadline - now))
            tick = self._next_tick(timeout) if self._follows_camera() else self._next_result(timeout)
            if isinstance(tick, str):
                return tick
            if tick is None:
                self.idle()
                continue
            reason = self._show(tick)
            if reason:
                return reason

    def _follows_camera(self) -> bool:
        return self.presenter is not None and getattr(self.presenter, "draws", True)

    def _next_result(self, timeout: float) -> Tick | str | None:
        """A tick per new AI result (nothing draws per camera frame)."""
        taken = self.results.wait_newer(self._result_seq, timeout)
        if taken is None:
            return "source ended" if self.results.closed and self.results.seq <= self._result_seq else None
        self._result_seq, result = taken
        return Tick(result.camera, result.seq, result, True)

    def _next_tick(self, timeout: float) -> Tick | str | None:
        """A tick per new camera frame, with the newest AI result. A new result waits for the next camera frame
        (at most one frame period), unless the source stalls or has ended: then it is shown on its own."""
        now = time.perf_counter()
        stall_at = self._last_camera_at + STALLED_SOURCE_S
        results, cameras = self.results, self.cameras
        result_due = results.seq > self._result_seq and (now >= stall_at or results.closed)
        with results.condition:  # both slots notify it
            if results.seq > self._result_seq and not result_due:
                results.condition.wait_for(lambda: cameras.seq > self._camera_seq or results.closed,
                                           max(0.0, min(timeout, stall_at - now)))
            elif not result_due:
                results.condition.wait_for(lambda: cameras.seq > self._camera_seq or results.seq > self._result_seq
                                           or results.closed, timeout)
        taken_camera = cameras.take_newer(self._camera_seq, 0)
        if taken_camera is not None:
            self._camera_seq, self._camera = taken_camera
            self._last_camera_at = time.perf_counter()
        results_over = results.closed
        stalled = time.perf_counter() >= self._last_camera_at + STALLED_SOURCE_S
        taken_result = results.take_newer(self._result_seq, 0) \
            if taken_camera is not None or results_over or stalled else None
        if taken_result is not None:
            self._result_seq, self._result = taken_result
        if self._result is None or not (taken_result is not None or taken_camera is not None):
            return "source ended" if results_over and results.seq <= self._result_seq else None
        camera = self._camera if self._camera is not None else self._result.camera
        return Tick(camera, self._camera_seq, self._result, taken_result is not None)

    def _show(self, tick: Tick) -> str:
        """Present one tick and count it; the stop reason when a frame or result limit is reached."""
        stats = self.control.stats
        stats.displayed += 1
        stats.display_rate.tick(time.perf_counter())
        self.control.publish_stats()  # the figures this tick shows count the tick itself
        if self.presenter is not None:
            self.presenter.present(tick, self.control)
        if tick.new_result:
            stats.results_displayed += 1
            stats.latencies_s.append(time.perf_counter() - tick.result.captured_at)
        if self.max_frames is not None and stats.displayed >= self.max_frames:
            return "max frames"
        if self.max_results is not None and stats.results_displayed >= self.max_results:
            return "max results"
        return ""


def run_loop(source: FrameSource, backend: Backend, presenter: Presenter | None = None, *,
             control: LoopControl | None = None, warmup: bool = False, max_frames: int | None = None,
             max_results: int | None = None, duration: float | None = None,
             on_warmup: Callable[[float], None] | None = None, on_ready: Callable[[float], None] | None = None,
             log: TextIO | None = None) -> LoopStats:
    """Run capture → inference → display until `max_frames` display ticks, `max_results` new AI results
    shown, `duration` seconds (counted from the end of warm-up), the source ended, the presenter quit,
    or a stage failed. Knobs (the first prompt among them) come from `control`'s requests.
    `on_warmup(elapsed_s)` is called every few seconds while the backend warms up, and `on_ready(elapsed_s)`
    once when it is done.

    A worker's exception (and Ctrl-C / SIGTERM raised on this thread) stops every stage; after the
    threads are joined it is raised here. The caller owns `source`, `backend` and the presenter's outputs.
    """
    control = control or LoopControl()
    stats = control.stats
    log = log if log is not None else sys.stderr
    frames: LatestSlot[tuple[float, np.ndarray]] = LatestSlot()
    cameras: LatestSlot[np.ndarray] = LatestSlot()
    results: LatestSlot[Result] = LatestSlot(cameras.condition)
    shutdown = Shutdown([frames, cameras, results])
    capture = CaptureStage(source, frames, cameras, control, shutdown)
    inference = InferenceStage(backend, frames, results, control, shutdown, warmup=warmup)
    display = DisplayLoop(cameras, results, presenter, control, shutdown,
                          max_frames=max_frames, max_results=max_results, duration=duration)
    inference_thread = threading.Thread(target=inference.run, name=INFERENCE_THREAD, daemon=True)
    capture_thread = threading.Thread(target=capture.run, name=CAPTURE_THREAD, daemon=True)
    started = time.perf_counter()
    try:
        inference_thread.start()
        _wait_for_warmup(inference, shutdown, control, display, on_warmup)
        if inference.ready.is_set() and not shutdown.stopped and not control.quit_requested:
            if on_ready is not None:
                on_ready(time.perf_counter() - started)
            capture_thread.start()
            started = time.perf_counter()
            stats.start(started)
            control.publish_stats()
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
        _join(((capture_thread, CAPTURE_JOIN_S), (inference_thread, INFERENCE_JOIN_S)), log)
        stats.elapsed_s = time.perf_counter() - started
        stats.dropped_before_inference = frames.dropped
        stats.dropped_before_display = results.dropped
    if shutdown.errors:
        stats.stop_reason = "error"
        raise shutdown.errors[0]
    return stats


def _join(threads: tuple[tuple[threading.Thread, float], ...], log: TextIO) -> None:
    """Wait for each thread up to its limit; say which one is still running past it."""
    for thread, limit in threads:
        if thread.is_alive():
            thread.join(limit)
        if thread.is_alive():
            print(f"mlx-sdxs: the {thread.name} thread did not stop within {limit:.0f} s", file=log)


def stuck_workers() -> list[str]:
    """Names of loop threads still running (a model call in native code that outlived its join limit)."""
    return [t.name for t in threading.enumerate() if t.name in (CAPTURE_THREAD, INFERENCE_THREAD) and t.is_alive()]


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

"""Deterministic stand-ins for the camera loop tests: a Backend and a frame source that stamp sequence numbers.

`CountingSource` writes each frame's 1-based sequence number into its first pixels; `FakeBackend`
reads it back, records it, and writes it into its output (the inverted, centre-cropped input), so a
test can trace every displayed image to the frame it came from.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import nullcontext
from typing import Callable

import cv2
import numpy as np
import pytest

from mlx_sdxs.camera.sources import Pacer
from mlx_sdxs.frames import fit


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Every camera test must leave no thread behind (import this fixture into the test module)."""
    before = set(threading.enumerate())
    yield
    leaked = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"threads left alive: {leaked}"


def count_video_frames(path) -> int:
    """Frames OpenCV can decode from a video file (0 when it is missing or unreadable)."""
    video = cv2.VideoCapture(str(path))
    count = 0
    while video.read()[0]:
        count += 1
    video.release()
    return count


def stamp(frame: np.ndarray, seq: int) -> np.ndarray:
    frame[0, :4, 0] = np.frombuffer(seq.to_bytes(4, "little"), np.uint8)
    return frame


def read_stamp(frame: np.ndarray) -> int:
    return int.from_bytes(frame[0, :4, 0].tobytes(), "little")


class CountingSource:
    """Frames of `width`×`height` stamped 1, 2, 3, …; paced at `fps` (0 = as fast as asked); ends after `count`.
    `static=True`: the very same pixels every time, unstamped (for the similarity filter)."""

    def __init__(self, width: int = 64, height: int = 48, fps: float = 0.0, count: int | None = None,
                 static: bool = False):
        self.name = f"counting {width}x{height}"
        self.fps, self.count, self.static = fps, count, static
        self.produced = 0
        self._pacer = Pacer(fps)
        y, x = np.mgrid[0:height, 0:width]
        # Gradients in green (x) and red (y): a horizontal shift changes the grey image a lot.
        self._base = np.stack([np.full_like(x, 128), x * 255 // max(1, width - 1),
                               y * 255 // max(1, height - 1)], axis=-1).astype(np.uint8)

    def read(self, stop: threading.Event | None = None) -> np.ndarray | None:
        if self.count is not None and self.produced >= self.count:
            return None
        if not self._pacer.wait(stop):
            return None
        self.produced += 1
        if self.static:
            return self._base.copy()
        return stamp(np.roll(self._base, self.produced * 3, axis=1), self.produced)

    def close(self) -> None:
        pass


class FakeBackend:
    """A Backend whose output encodes its input. `cost_s` sleeps per frame (releasing the GIL, like real
    compute); `fail_at=k` raises on the k-th `process` call; `on_frame(k)` runs after the k-th."""

    name = "fake"
    controlled = False

    def __init__(self, render_size: int | tuple[int, int] = 64, cost_s: float = 0.0, fail_at: int | None = None,
                 on_frame: Callable[[int], None] | None = None, label: str | None = None):
        self.render_size = (render_size, render_size) if isinstance(render_size, int) else tuple(render_size)
        self.cost_s, self.fail_at, self.on_frame = cost_s, fail_at, on_frame
        self.label = label
        self.profile_stages = False
        self.last_stage_ms: dict[str, float] = {}
        self.processed: list[int] = []
        self.spans: list[tuple[float, float]] = []  # (start, end) of each process call
        self.prompts: list[str] = []
        self.requests: list[tuple[str, object]] = []
        self.threads: set[str] = set()
        self.warmed = False
        self.closed = False
        self.failed_at: float | None = None

    def set_prompt(self, prompt: str | None, prompt_b: str | None = None,
                   blend: float | None = None) -> tuple[str, ...]:
        self.threads.add(threading.current_thread().name)
        prompt = prompt if prompt is not None else self.prompts[-1]  # None keeps the prompt, as a Recipe does
        self.prompts.append(prompt)
        if prompt_b is not None or blend is not None:
            self.requests.append(("prompt_b", (prompt_b, blend)))
        return tuple(text for text in (prompt, prompt_b) if text and len(text) > 300)  # the tokenizer's limit

    def set_prompt_blend(self, blend: float) -> None:
        self.requests.append(("prompt_blend", blend))

    def set_feedback(self, feedback: float) -> None:
        self.requests.append(("feedback", feedback))

    def set_seed_blend(self, blend: float) -> None:
        self.requests.append(("seed_blend", blend))

    def set_control_mode(self, mode) -> None:
        self.requests.append(("control", mode))

    def set_control_strength(self, strength) -> None:
        self.requests.append(("control_strength", strength))

    def worker(self):
        return nullcontext()

    def warmup(self) -> None:
        self.threads.add(threading.current_thread().name)
        self.warmed = True

    def submit(self, frame_bgr: np.ndarray) -> np.ndarray:
        """No device: all the work happens here, and the handle is the result."""
        return self.process(frame_bgr)

    def collect(self, pending: np.ndarray) -> np.ndarray:
        return pending

    def process(self, frame_bgr: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        self.threads.add(threading.current_thread().name)
        call = len(self.processed) + 1
        if self.fail_at == call:
            self.failed_at = start
            raise RuntimeError(f"fake failure at call {call}")
        seq = read_stamp(frame_bgr)
        if self.cost_s:
            time.sleep(self.cost_s)
        out = 255 - fit(frame_bgr, self.render_size)
        stamp(out, seq)
        self.processed.append(seq)
        self.spans.append((start, time.perf_counter()))
        if self.on_frame is not None:
            self.on_frame(call)
        return out

    def close(self) -> None:
        self.closed = True


def ctrl_c_after_frames(frames_dir, count: int = 3):
    """An `on_frame` hook that presses Ctrl-C (SIGINT to the main thread) once, after `count` frames were
    written to `frames_dir`, so a recording has something in it when the interrupt lands."""
    sent = []

    def interrupt(call: int) -> None:
        if not sent and len(list(frames_dir.glob("*.png"))) >= count:
            sent.append(call)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    return interrupt

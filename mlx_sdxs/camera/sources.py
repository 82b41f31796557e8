"""Frame sources for the camera loop: a camera by index, a video file, or a built-in synthetic scene.

Every source hands out fresh uint8 BGR frames from `read(stop)` and returns None once it has ended
(or `stop` was set while it waited). Sources that would otherwise spin (video, synthetic) pace
themselves to their `fps`; a camera blocks in the driver at its own rate.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Protocol, TextIO

import cv2
import numpy as np

from mlx_sdxs.errors import ImageError, SourceError
from mlx_sdxs.frames import MIN_SIDE

DEFAULT_SIZE = (640, 480)
DEFAULT_FPS = 30.0
#: The built-in scene: its source name and `--source` spelling (`synthetic:IMAGE` pans over an image).
SYNTHETIC = "synthetic"
#: Waits between reconnect attempts when a camera stops delivering (seconds); then the source gives up.
RECONNECT_DELAYS = (0.25, 0.5, 1.0)


class FrameSource(Protocol):
    name: str
    #: Nominal frame rate (0 = unpaced); recordings use it as their container rate.
    fps: float

    def read(self, stop: threading.Event | None = None) -> np.ndarray | None:
        """The next frame, or None when the source has ended or `stop` was set while waiting."""

    def close(self) -> None:
        """Release the device/file; idempotent."""


def validate_frame(frame: object, source_name: str) -> np.ndarray:
    """Refuse frames the loop cannot use, naming the source (a 1×1 frame is a broken device, not an image)."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        shape = getattr(frame, "shape", None)
        raise ImageError(f"{source_name} delivered a frame of shape {shape}; expected uint8 H×W×3 (BGR)")
    height, width = frame.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise ImageError(f"{source_name} delivered a {width}×{height} frame: too small, "
                         f"frames need at least {MIN_SIDE}×{MIN_SIDE} pixels")
    return frame


class Pacer:
    """Releases one frame per 1/fps seconds on absolute deadlines, so per-frame overhead does not accumulate."""

    def __init__(self, fps: float):
        self.period = 1.0 / fps if fps > 0 else 0.0
        self._next = None

    def wait(self, stop: threading.Event | None) -> bool:
        """Wait for the next slot; False when `stop` was set meanwhile."""
        if self.period == 0.0:
            return not (stop and stop.is_set())
        now = time.perf_counter()
        if self._next is None or now - self._next > self.period:
            self._next = now  # first frame, or fell far behind: restart rather than burst to catch up
        delay = self._next - now
        self._next += self.period
        if delay <= 0:
            return not (stop and stop.is_set())
        if stop is None:
            time.sleep(delay)
            return True
        return not stop.wait(delay)


class SyntheticSource:
    """A deterministic moving scene that needs no camera or file: frame k depends only on (random seed, k, size).

    A smooth colour field with drifting shapes, slowly panned and zoomed; with `image`, that picture
    is panned and zoomed instead. Enough motion and texture to exercise the loop and the model.
    """

    def __init__(self, width: int = DEFAULT_SIZE[0], height: int = DEFAULT_SIZE[1], fps: float = DEFAULT_FPS,
                 seed: int = 0, image: str | Path | None = None):
        if min(width, height) < MIN_SIDE:
            raise SourceError(f"synthetic source size {width}×{height} is too small: "
                              f"at least {MIN_SIDE}×{MIN_SIDE}")
        self.width, self.height, self.fps, self.seed = width, height, fps, seed
        self.name = f"{SYNTHETIC}:{image}" if image else SYNTHETIC
        self.index = 0
        self._pacer = Pacer(fps)
        rng = np.random.default_rng(seed)
        if image is not None:
            picture = cv2.imread(str(image), cv2.IMREAD_COLOR)
            if picture is None:
                raise SourceError(f"synthetic source image {image} cannot be read (missing or not an image)")
            self._canvas = cv2.resize(picture, (width, height), interpolation=cv2.INTER_AREA)
            self._shapes = []
        else:
            # Smooth field: a few random colours upsampled bicubically; shapes drift on Lissajous paths.
            field = rng.uniform(40, 215, size=(3, 4, 3)).astype(np.float32)
            smooth = cv2.resize(field, (width, height), interpolation=cv2.INTER_CUBIC)
            self._canvas = np.clip(smooth, 0, 255).astype(np.uint8)
            self._shapes = [
                (rng.uniform(0.1, 0.9, 2), rng.uniform(0.1, 0.35, 2), rng.uniform(0.2, 0.9, 2),
                 rng.uniform(0, 2 * np.pi, 2), rng.uniform(0.05, 0.18), tuple(int(c) for c in rng.integers(0, 256, 3)),
                 bool(rng.integers(0, 2)))
                for _ in range(6)
            ]
        self._phase = rng.uniform(0, 2 * np.pi, 4)

    def render(self, index: int) -> np.ndarray:
        """Frame `index` of the scene (pure: same arguments, same pixels)."""
        t = index / (self.fps if self.fps > 0 else DEFAULT_FPS)
        width, height = self.width, self.height
        if self._shapes:
            tint = 25.0 * np.sin(0.7 * t + self._phase[:3])  # slow colour breathing of the background
            frame = cv2.add(self._canvas, (*tint.tolist(), 0.0))  # saturating, unlike numpy uint8
            side = min(width, height)
            for centre, amplitude, speed, phase, radius, colour, is_circle in self._shapes:
                x = int(width * (centre[0] + amplitude[0] * np.sin(speed[0] * t + phase[0])))
                y = int(height * (centre[1] + amplitude[1] * np.sin(speed[1] * t + phase[1])))
                r = max(2, int(side * radius))
                if is_circle:
                    cv2.circle(frame, (x, y), r, colour, -1, cv2.LINE_AA)
                else:
                    cv2.rectangle(frame, (x - r, y - r // 2), (x + r, y + r // 2), colour, -1, cv2.LINE_AA)
        else:
            frame = self._canvas
        # Slow pan and zoom (Ken Burns) about the centre.
        zoom = 1.15 + 0.1 * np.sin(0.23 * t + self._phase[3])
        shift_x = 0.06 * width * np.sin(0.17 * t)
        shift_y = 0.06 * height * np.cos(0.13 * t)
        matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), 0.0, zoom)
        matrix[:, 2] += (shift_x, shift_y)
        return cv2.warpAffine(frame, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    def read(self, stop: threading.Event | None = None) -> np.ndarray | None:
        if not self._pacer.wait(stop):
            return None
        frame = self.render(self.index)
        self.index += 1
        return frame

    def close(self) -> None:
        pass


Capture = Callable[..., "cv2.VideoCapture"]


class CameraSource:
    """A camera by index; when it stops delivering, reconnect a few times with backoff, then raise SourceError."""

    def __init__(self, index: int, width: int = DEFAULT_SIZE[0], height: int = DEFAULT_SIZE[1],
                 fps: float = DEFAULT_FPS, open_capture: Capture = cv2.VideoCapture,
                 reconnect_delays: tuple[float, ...] = RECONNECT_DELAYS, log: TextIO | None = None):
        self.index, self.width, self.height, self.fps = index, width, height, fps
        self.name = f"camera {index}"
        self.reconnects = 0
        self._open_capture, self._delays = open_capture, reconnect_delays
        self._log = log if log is not None else sys.stderr
        self._capture = self._open()
        if self._capture is None:
            raise SourceError(f"camera {index} did not open (is it connected, not in use by another program, "
                              "and allowed camera access?)")

    def _open(self):
        # OpenCV logs a dozen WARN/ERROR lines per backend it tries for a missing camera; the
        # SourceError raised for it says the one thing that matters.
        log_level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        try:
            capture = self._open_capture(self.index)
        finally:
            cv2.utils.logging.setLogLevel(log_level)
        if not capture.isOpened():
            capture.release()
            return None
        capture.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        capture.set(cv2.CAP_PROP_FPS, self.fps)
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # keep the driver queue short: latency, not completeness
        return capture

    def read(self, stop: threading.Event | None = None) -> np.ndarray | None:
        ok, frame = self._capture.read() if self._capture is not None else (False, None)
        if ok and frame is not None:
            return frame
        for attempt, delay in enumerate(self._delays, 1):
            print(f"mlx-sdxs: {self.name} stopped delivering frames; reconnecting "
                  f"(attempt {attempt}/{len(self._delays)})", file=self._log)
            if stop is not None and stop.wait(delay):
                return None
            if stop is None:
                time.sleep(delay)
            if self._capture is not None:
                self._capture.release()
            self.reconnects += 1
            self._capture = self._open()
            if self._capture is not None:
                ok, frame = self._capture.read()
                if ok and frame is not None:
                    return frame
        raise SourceError(f"{self.name} stopped delivering frames and {len(self._delays)} reconnect attempts failed")

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


class VideoFileSource:
    """A video file played at its own frame rate (or `fps`; 0 = as fast as it decodes), looping by default."""

    def __init__(self, path: str | Path, loop: bool = True, fps: float | None = None,
                 open_capture: Capture = cv2.VideoCapture):
        self.path, self.loop = Path(path), loop
        self.name = f"video {self.path}"
        self._open_capture = open_capture
        if not self.path.is_file():
            raise SourceError(f"video file {self.path} does not exist")
        self._capture = open_capture(str(self.path))
        ok, self._first = self._capture.read() if self._capture.isOpened() else (False, None)
        if not ok or self._first is None:
            self._capture.release()
            raise SourceError(f"video file {self.path} cannot be read: not a video OpenCV can decode")
        native = self._capture.get(cv2.CAP_PROP_FPS)
        self.fps = fps if fps is not None else (native if native and native > 0 else DEFAULT_FPS)
        self._pacer = Pacer(self.fps)

    def read(self, stop: threading.Event | None = None) -> np.ndarray | None:
        if not self._pacer.wait(stop):
            return None
        if self._first is not None:
            frame, self._first = self._first, None
            return frame
        ok, frame = self._capture.read()
        if ok:
            return frame
        if not self.loop:
            return None
        # Rewind; some containers refuse to seek, so reopen as the fallback.
        self._capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
        ok, frame = self._capture.read()
        if not ok:
            self._capture.release()
            self._capture = self._open_capture(str(self.path))
            ok, frame = self._capture.read()
        if not ok:
            raise SourceError(f"video file {self.path} could not be rewound to loop (use --no-loop)")
        return frame

    def close(self) -> None:
        self._capture.release()


def _camera_present(index: int) -> bool:
    """Cheap pre-check on Linux (V4L2 device node) so a camera-less machine skips OpenCV's probe warnings."""
    return not sys.platform.startswith("linux") or os.path.exists(f"/dev/video{index}")


def open_source(spec: str | None, *, size: tuple[int, int] = DEFAULT_SIZE, fps: float | None = None,
                loop: bool = True, log: TextIO | None = None) -> FrameSource:
    """Open what `--source` names: None (camera 0, else the synthetic scene), "synthetic[:image]",
    a camera index ("0", "1", …) or a video file path."""
    log = log if log is not None else sys.stderr
    width, height = size
    camera_fps = fps if fps is not None else DEFAULT_FPS
    if spec is None:
        if _camera_present(0):
            try:
                return CameraSource(0, width, height, camera_fps, log=log)
            except SourceError:
                pass
        print("mlx-sdxs: no camera found (camera 0 did not open); using the built-in synthetic scene "
              "(--source synthetic). Pick a camera with --source N or a video with --source PATH", file=log)
        return SyntheticSource(width, height, camera_fps)
    if spec == SYNTHETIC or spec.startswith(SYNTHETIC + ":"):
        image = spec.partition(":")[2] or None
        return SyntheticSource(width, height, camera_fps, image=image)
    if spec.strip().isdigit():
        return CameraSource(int(spec), width, height, camera_fps, log=log)
    return VideoFileSource(spec, loop=loop, fps=fps)

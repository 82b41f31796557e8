"""Where the presenter's frames go: an OpenCV window, a video file, numbered PNGs, and — when there is no
window — a status line that says the loop is alive. Each output takes one of the `VIEWS`:
"display" (camera | AI with overlays), "ai" (the AI image as shown) or "camera"."""

from __future__ import annotations

import os
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Protocol, TextIO

import cv2
import numpy as np

from mlx_sdxs.camera.sources import DEFAULT_FPS
from mlx_sdxs.camera.state import LiveState
from mlx_sdxs.errors import SDXSError

RECORD_SUFFIXES = (".mp4", ".mov", ".m4v")
#: What an output shows: the AI image as shown, the window (camera | AI with overlays), the camera frame.
AI_VIEW, DISPLAY_VIEW, CAMERA_VIEW = "ai", "display", "camera"
VIEWS = (AI_VIEW, DISPLAY_VIEW, CAMERA_VIEW)
#: Where snapshots (the s key, the studio's) go unless --save-dir says otherwise.
SAVE_DIR = Path("captures")
#: A fragment (and a keyframe) every second, flushed as written: a file cut off by a crash loses at most the last
#: second. Shared by the recordings and `mlx-sdxs stylize`.
FRAGMENTED_MP4 = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "frag_duration": "1000000",
                  "flush_packets": "1"}


def h264_options(fps: float) -> dict[str, str]:
    """libx264's settings for an output at `fps`: a keyframe every second (one per fragment)."""
    return {"preset": "veryfast", "crf": "20", "tune": "zerolatency", "g": str(max(1, round(fps)))}


class OutputError(SDXSError):
    """An output (window, video file, frames folder, server port) cannot be written."""


class Sink(Protocol):
    #: Which view it takes: "display" (camera | AI, overlays), "ai" (the AI image as shown) or "camera".
    view: str

    def write(self, frame: np.ndarray, now: float) -> None: ...

    def close(self) -> None: ...


def display_available() -> bool:
    """Whether an OpenCV window can open: on Linux an X11 or Wayland display must be set."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


class OpenCVWindow:
    """An OpenCV window; must be created and used on the main thread (macOS)."""

    def __init__(self, title: str = "mlx-sdxs camera"):
        self.title = title
        try:
            cv2.namedWindow(title, cv2.WINDOW_AUTOSIZE)
        except cv2.error as exc:  # e.g. opencv-python-headless has no GUI
            raise OutputError(f"cannot open a window: {exc.msg.strip() or exc}") from None
        self._shown = False

    def show(self, frame: np.ndarray) -> None:
        cv2.imshow(self.title, frame)
        self._shown = True

    def poll_key(self) -> int:
        """The pressed key (-1 for none); 'q' when the user closed the window."""
        key = cv2.waitKey(1)
        if self._shown and cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1:
            return ord("q")
        return key & 0xFF if key >= 0 else -1

    def close(self) -> None:
        cv2.destroyWindow(self.title)
        cv2.waitKey(1)


class _H264Writer:
    """H.264 (libx264, yuv420p) in a fragmented MP4 through PyAV: plays in browsers, and a file cut off
    by a crash still plays up to its last fragment."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]):
        import av

        self._container = av.open(str(path), "w", format="mp4", options=FRAGMENTED_MP4)
        rate = Fraction(fps).limit_denominator(1001)
        self._stream = self._container.add_stream("libx264", rate=rate)
        self._stream.width, self._stream.height = size
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = h264_options(fps)
        self._size = size
        self._av = av

    def write(self, frame: np.ndarray) -> None:
        width, height = self._size
        picture = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:height, :width]), format="bgr24")
        for packet in self._stream.encode(picture):
            self._container.mux(packet)

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()


class _OpenCVWriter:
    """OpenCV's mp4v, when PyAV is not installed (most browsers cannot play it)."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]):
        self._writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        if not self._writer.isOpened():
            raise OutputError(f"OpenCV cannot write mp4v video to {path}")

    def write(self, frame: np.ndarray) -> None:
        self._writer.write(frame)

    def close(self) -> None:
        self._writer.release()


def h264_available() -> bool:
    try:
        import av
    except ImportError:
        return False
    return "libx264" in av.codecs_available


class VideoRecorder:
    """A video at a fixed rate, written in real time (frames repeated or skipped to match the clock), or
    with `every_frame`, exactly one video frame per display tick (deterministic; for tests and bench).

    H.264 with PyAV (the `studio` extra), else OpenCV's mp4v. Written under a hidden temporary name and
    renamed on `close`, so the final name never holds a half-written file; `close` runs on every exit
    path, Ctrl-C and SIGTERM included. `view` "ai" records the AI image as shown (the default), "display"
    the whole window."""

    def __init__(self, path: str | Path, fps: float, log: TextIO | None = None, every_frame: bool = False,
                 view: str = AI_VIEW):
        self.path = Path(path)
        self.every_frame, self.view = every_frame, view
        if self.path.suffix.lower() not in RECORD_SUFFIXES:
            raise OutputError(f"--record {self.path}: use a {'/'.join(RECORD_SUFFIXES)} file name")
        if view not in VIEWS:
            raise OutputError(f"--record-view must be one of {', '.join(VIEWS)}, not {view!r}")
        if not self.path.parent.is_dir():
            raise OutputError(f"--record {self.path}: folder {self.path.parent} does not exist")
        self.fps = fps if fps > 0 else DEFAULT_FPS
        self.codec = "h264" if h264_available() else "mp4v"
        self.partial = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self.frames_written = 0
        self.size: tuple[int, int] | None = None
        self._writer: _H264Writer | _OpenCVWriter | None = None
        self._start: float | None = None
        self._log = log if log is not None else sys.stderr

    def write(self, frame: np.ndarray, now: float) -> None:
        if self._writer is None:
            height, width = frame.shape[:2]
            # yuv420p needs even sides: drop a last odd row/column rather than scale the picture.
            self.size = (width - width % 2, height - height % 2) if self.codec == "h264" else (width, height)
            writer_cls = _H264Writer if self.codec == "h264" else _OpenCVWriter
            try:
                self._writer = writer_cls(self.partial, self.fps, self.size)
            except OSError as exc:
                raise OutputError(f"--record {self.path}: cannot write {self.partial} ({exc})") from None
            self._start = now
        due = self.frames_written + 1 if self.every_frame else max(1, int((now - self._start) * self.fps) + 1)
        for _ in range(due - self.frames_written):
            self._writer.write(frame)
        self.frames_written = max(self.frames_written, due)

    def close(self) -> None:
        if self._writer is None:
            if self.frames_written == 0:
                print(f"mlx-sdxs: nothing recorded to {self.path} (no frame was displayed)", file=self._log)
            return
        writer, self._writer = self._writer, None
        writer.close()
        os.replace(self.partial, self.path)
        width, height = self.size
        print(f"mlx-sdxs: recorded {self.frames_written} frames ({self.frames_written / self.fps:.1f} s, "
              f"{width}x{height} {self.codec}) to {self.path}", file=self._log)


class FramesWriter:
    """Every displayed frame as a numbered PNG."""

    view = DISPLAY_VIEW

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"--frames-dir {self.folder}: {exc.strerror}") from None
        self.count = 0

    def write(self, frame: np.ndarray, now: float) -> None:
        self.count += 1
        path = self.folder / f"frame_{self.count:06d}.png"
        if not cv2.imwrite(str(path), frame):
            raise OutputError(f"--frames-dir: cannot write {path}")

    def close(self) -> None:
        pass


class StatusLine:
    """Says the loop is alive when there is no window: AI FPS, display FPS, latency, frames dropped —
    refreshed in place on a terminal, one line every `every_s` seconds otherwise."""

    def __init__(self, stream: TextIO | None = None, every_s: float | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s if every_s is not None else (0.5 if self.tty else 10.0)
        self._next = time.perf_counter() + self.every_s
        self._written = False

    @staticmethod
    def line(state: LiveState) -> str:
        live = state.stats
        if not live:
            return "waiting for the first frames"
        blends = f" | prompt blend {state.prompt_blend:.2f}" if state.prompt_b else ""
        return (f"AI {live['ai_fps']:.2f} FPS | display {live['display_fps']:.1f} FPS | latency "
                f"{live['latency_ms']:.0f} ms | dropped {live['dropped']} | frames {live['inferred']} | "
                f"feedback {state.feedback:.2f}{blends}")

    def update(self, state: LiveState, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if now < self._next:
            return
        self._next = now + self.every_s
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line(state))
        else:
            self.stream.write(f"mlx-sdxs: {self.line(state)}\n")
        self.stream.flush()
        self._written = True

    def close(self) -> None:
        if self.tty and self._written:
            self.stream.write("\n")
            self.stream.flush()



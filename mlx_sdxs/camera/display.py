"""The display stage: camera | AI side by side with the demo's overlays, keys, and every output
(OpenCV window, video file, PNG frames, the studio's stream), plus a status line for headless runs.

Runs on the main thread, once per display tick (the capture rate): the EMA eases the shown AI image
towards the newest result every tick, and the camera half and the camera blend follow the newest
camera frame. Three views: "display" (camera | AI with overlays, what the window shows), "ai" (the
AI image as shown, blend and EMA applied, at the render size: what recordings keep) and "camera" (the
camera frame fitted to the render size, as the model sees it).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from typing import Protocol, Sequence, TextIO

import cv2
import numpy as np

from mlx_sdxs.camera.loop import LoopControl, LoopStats, Tick
from mlx_sdxs.errors import SDXSError
from mlx_sdxs.frames import fit

FONT = cv2.FONT_HERSHEY_SIMPLEX
STEP = 0.1
EMA_MAX = 0.9
KEY_ESC = 27
RECORD_SUFFIXES = (".mp4", ".mov", ".m4v")
VIEWS = ("ai", "display", "camera")


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


def _ascii(text: str) -> str:
    # OpenCV's Hershey fonts draw ASCII only; anything else would print as garbage.
    return text.encode("ascii", "replace").decode("ascii")


def _thickness(scale: float) -> int:
    return max(1, round(scale * 2))


def _put_text(image: np.ndarray, text: str, origin: tuple[int, int], scale: float) -> None:
    """White text on a darkened box. (An outline drawn with thicker strokes misaligns under OpenCV 5's
    font engine, where thickness changes the glyph advance.)"""
    (width, height), baseline = cv2.getTextSize(text, FONT, scale, _thickness(scale))
    x, y = origin
    pad = max(2, height // 4)
    top, bottom = max(0, y - height - pad), min(image.shape[0], y + baseline + pad)
    left, right = max(0, x - pad), min(image.shape[1], x + width + pad)
    image[top:bottom, left:right] = (image[top:bottom, left:right] * 0.35).astype(image.dtype)
    cv2.putText(image, text, origin, FONT, scale, (255, 255, 255), _thickness(scale), cv2.LINE_AA)


def _fit_text(text: str, width: int, scale: float) -> str:
    """Shorten `text` with an ellipsis until it fits `width` pixels."""
    text = _ascii(text)
    thickness = _thickness(scale)
    full = cv2.getTextSize(text, FONT, scale, thickness)[0][0]
    if full <= width:
        return text
    keep = max(0, len(text) * width // full - 3)  # proportional first guess, then trim the remainder
    while keep > 0 and cv2.getTextSize(text[:keep] + "...", FONT, scale, thickness)[0][0] > width:
        keep -= 1
    return text[:keep] + "..."


def draw_banner(image: np.ndarray, text: str) -> np.ndarray:
    """A black band with white text across the bottom (channel-order neutral: works on BGR and RGB). In place."""
    height, width = image.shape[:2]
    scale = max(0.35, width / 1400)
    band = int(32 * scale / 0.5)
    image[height - band :] = (image[height - band :] * 0.15).astype(image.dtype)
    _put_text(image, _fit_text(text, width - 16, scale), (8, height - band // 3), scale)
    return image


def draw_overlay(image: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Status lines at the top left, on dark boxes so they read on any background. In place."""
    width = image.shape[1]
    scale = max(0.4, width / 2200)
    step = int(28 * scale / 0.5)
    for row, line in enumerate(lines):
        _put_text(image, _fit_text(line, width - 16, scale), (8, step * (row + 1)), scale)
    return image


def compose_frame(camera: np.ndarray, ai: np.ndarray, height: int, *, blend: float = 0.0,
                  lines: Sequence[str] = (), banner: str | None = None) -> np.ndarray:
    """camera | AI, each `height` tall at the AI image's aspect, the camera fitted like the backend does;
    AI half = (1 − blend)·AI + blend·camera; then the overlay lines and the banner."""
    half = (max(1, round(height * ai.shape[1] / ai.shape[0])), height)
    camera_half = fit(camera, half)
    ai_half = fit(ai, half)
    if blend > 0:
        ai_half = cv2.addWeighted(ai_half, 1.0 - blend, camera_half, blend, 0.0)
    canvas = np.concatenate([camera_half, ai_half], axis=1)
    if lines:
        draw_overlay(canvas, lines)
    if banner:
        draw_banner(canvas, banner)
    return canvas


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

        # A fragment (and a keyframe) every second, flushed as written: at most the last second is lost.
        self._container = av.open(str(path), "w", format="mp4", options={
            "movflags": "frag_keyframe+empty_moov+default_base_moof", "frag_duration": "1000000",
            "flush_packets": "1"})
        rate = Fraction(fps).limit_denominator(1001)
        self._stream = self._container.add_stream("libx264", rate=rate)
        self._stream.width, self._stream.height = size
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"preset": "veryfast", "crf": "20", "tune": "zerolatency",
                                "g": str(max(1, round(fps)))}
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
                 view: str = "ai"):
        self.path = Path(path)
        self.every_frame, self.view = every_frame, view
        if self.path.suffix.lower() not in RECORD_SUFFIXES:
            raise OutputError(f"--record {self.path}: use a {'/'.join(RECORD_SUFFIXES)} file name")
        if view not in VIEWS:
            raise OutputError(f"--record-view must be one of {', '.join(VIEWS)}, not {view!r}")
        if not self.path.parent.is_dir():
            raise OutputError(f"--record {self.path}: folder {self.path.parent} does not exist")
        self.fps = fps if fps > 0 else 30.0
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

    view = "display"

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
    def line(stats: LoopStats) -> str:
        live = stats.live()
        return (f"AI {live['ai_fps']:.2f} FPS | display {live['display_fps']:.1f} FPS | latency "
                f"{live['latency_ms']:.0f} ms | dropped {live['dropped']} | frames {stats.inferred}")

    def update(self, stats: LoopStats, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if now < self._next:
            return
        self._next = now + self.every_s
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line(stats))
        else:
            self.stream.write(f"mlx-sdxs: {self.line(stats)}\n")
        self.stream.flush()
        self._written = True

    def close(self) -> None:
        if self.tty and self._written:
            self.stream.write("\n")
            self.stream.flush()


class DisplayStage:
    """Composes and shows each tick, eases the AI image (EMA) and blends the camera in, handles the keys.

    Keys: q/ESC quit · s save the AI image · n/p next/previous prompt · +/- camera blend · e/d EMA ·
    [/] prompt A↔B blend · ,/. random-seed A↔B blend.
    """

    def __init__(self, *, output_size: int, prompts: Sequence[str], prompt_index: int = 0, blend: float = 0.0,
                 ema: float = 0.4, label: str | None = None, window: OpenCVWindow | None = None,
                 sinks: Sequence[Sink] = (), save_dir: str | Path = "captures", overlay: bool = True,
                 prompt_b: str | None = None, prompt_blend: float = 0.0, seed_blend: float | None = None,
                 status: StatusLine | None = None, log: TextIO | None = None):
        self.output_size, self.prompts, self.prompt_index = output_size, list(prompts), prompt_index
        self.blend, self.ema, self.label = blend, ema, label
        self.prompt_b, self.prompt_blend, self.seed_blend = prompt_b, prompt_blend, seed_blend
        self.window, self.sinks, self.save_dir, self.overlay = window, list(sinks), Path(save_dir), overlay
        self.status = status
        self._log = log if log is not None else sys.stderr
        self._shown_ai: np.ndarray | None = None  # float32 EMA state at the render size
        self.last_frame: np.ndarray | None = None
        self.last_ai_view: np.ndarray | None = None

    def status_lines(self, control: LoopControl) -> list[str]:
        stats = control.stats
        prompt = self.prompts[self.prompt_index] if self.prompts else ""
        blends = f"prompt blend {self.prompt_blend:.1f} | " if self.prompt_b else ""
        blends += f"seed blend {self.seed_blend:.1f} | " if self.seed_blend is not None else ""
        return [
            f"AI: {stats.ai_rate.rate():.1f} FPS | Display: {stats.display_rate.rate():.1f} FPS | "
            f"Prompt {self.prompt_index + 1}/{len(self.prompts)}: {prompt}",
            f"{blends}blend {self.blend:.1f} | ema {self.ema:.1f} | q quit  s save  n/p prompt  +/- blend  e/d ema",
        ]

    def smooth(self, ai: np.ndarray) -> np.ndarray:
        """One EMA step: shown = ema·previous_shown + (1 − ema)·newest, at the AI image's size."""
        if self._shown_ai is None or self.ema <= 0 or self._shown_ai.shape != ai.shape:
            self._shown_ai = ai.astype(np.float32)
            return ai
        self._shown_ai = self.ema * self._shown_ai + (1.0 - self.ema) * ai
        return np.clip(self._shown_ai + 0.5, 0, 255).astype(np.uint8)

    @property
    def draws(self) -> bool:
        """Whether any output takes frames (a window or a sink); headless with only a status line, none does."""
        return self.window is not None or bool(self.sinks)

    def present(self, tick: Tick, control: LoopControl) -> None:
        if not self.draws:
            self.idle(control)
            return
        now = time.perf_counter()
        ai = self.smooth(tick.result.ai)
        camera = fit(tick.camera, (ai.shape[1], ai.shape[0]))
        if self.blend > 0:
            ai = cv2.addWeighted(ai, 1.0 - self.blend, camera, self.blend, 0.0)
        ai_view = draw_banner(ai.copy(), self.label) if self.label else ai
        lines = self.status_lines(control) if self.overlay else ()
        frame = compose_frame(camera, ai, self.output_size, lines=lines, banner=self.label)
        self.last_frame, self.last_ai_view = frame, ai_view
        views = {"ai": ai_view, "display": frame, "camera": camera}
        for sink in self.sinks:
            sink.write(views[sink.view], now)
        if self.window is not None:
            self.window.show(frame)
        self.idle(control)

    def idle(self, control: LoopControl) -> None:
        if self.window is not None:
            self.handle_key(self.window.poll_key(), control)
        if self.status is not None:
            self.status.update(control.stats)

    def handle_key(self, key: int, control: LoopControl) -> None:
        if key < 0:
            return
        char = chr(key).lower() if key < 256 else ""
        if key == KEY_ESC or char == "q":
            control.quit()
        elif char == "s":
            self.save()
        elif char in ("n", "p") and self.prompts:
            self.prompt_index = (self.prompt_index + (1 if char == "n" else -1)) % len(self.prompts)
            control.request(prompt=self.prompts[self.prompt_index])
        elif char in ("+", "=", "-", "_"):
            self.blend = _step(self.blend, char in ("+", "="), 1.0)
        elif char in ("e", "d"):
            self.ema = _step(self.ema, char == "e", EMA_MAX)
        elif char in ("[", "]") and self.prompt_b:
            self.prompt_blend = _step(self.prompt_blend, char == "]", 1.0)
            control.request(prompt_blend=self.prompt_blend)
        elif char in (",", ".") and self.seed_blend is not None:
            self.seed_blend = _step(self.seed_blend, char == ".", 1.0)
            control.request(seed_blend=self.seed_blend)

    def save(self) -> Path | None:
        """The AI image as shown (EMA and blend applied, no overlays) to a timestamped PNG in `save_dir`."""
        if self.last_ai_view is None:
            return None
        self.save_dir.mkdir(parents=True, exist_ok=True)
        path = self.save_dir / f"mlx-sdxs-{datetime.now():%Y%m%d-%H%M%S-%f}.png"
        if not cv2.imwrite(str(path), self.last_ai_view):
            raise OutputError(f"cannot write {path}")
        print(f"mlx-sdxs: saved {path}", file=self._log)
        return path

    def close(self) -> None:
        """Finalise every output, even if one of them fails (the first failure is re-raised)."""
        failure: BaseException | None = None
        closers = [sink.close for sink in self.sinks] + ([self.window.close] if self.window else [])
        closers += [self.status.close] if self.status else []
        for closer in closers:
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 — finish the others, then report
                failure = failure or exc
        if failure is not None:
            raise failure


def _step(value: float, up: bool, high: float) -> float:
    return min(high, round(value + STEP, 2)) if up else max(0.0, round(value - STEP, 2))

"""The display stage: camera | AI side by side with the seed's overlays, keys, and every output
(OpenCV window, video file, PNG frames, MJPEG preview).

Runs on the main thread. The camera half is the exact frame the AI half was computed from, so the
two are comparable and the camera blend lines up.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Protocol, Sequence, TextIO

import cv2
import numpy as np

from mlx_sdxs.backends.base import center_crop_resize
from mlx_sdxs.camera.loop import LoopControl, Result
from mlx_sdxs.errors import SDXSError

FONT = cv2.FONT_HERSHEY_SIMPLEX
BLEND_STEP = 0.1
EMA_STEP = 0.1
EMA_MAX = 0.9
KEY_ESC = 27
RECORD_SUFFIXES = (".mp4", ".mov", ".m4v")


class OutputError(SDXSError):
    """An output (window, video file, frames folder, preview port) cannot be written."""


class Sink(Protocol):
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


def _fit(text: str, width: int, scale: float) -> str:
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
    _put_text(image, _fit(text, width - 16, scale), (8, height - band // 3), scale)
    return image


def draw_overlay(image: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """Status lines at the top left, outlined so they read on any background. In place."""
    width = image.shape[1]
    scale = max(0.4, width / 2200)
    step = int(28 * scale / 0.5)
    for row, line in enumerate(lines):
        _put_text(image, _fit(line, width - 16, scale), (8, step * (row + 1)), scale)
    return image


def compose_frame(camera: np.ndarray, ai: np.ndarray, size: int, *, blend: float = 0.0,
                  lines: Sequence[str] = (), banner: str | None = None) -> np.ndarray:
    """camera | AI, each `size`², camera centre-cropped like the backend; AI half =
    (1 − blend)·AI + blend·camera; then the overlay lines and the banner."""
    camera_square = center_crop_resize(camera, size)
    ai_square = center_crop_resize(ai, size)
    if blend > 0:
        ai_square = cv2.addWeighted(ai_square, 1.0 - blend, camera_square, blend, 0.0)
    canvas = np.concatenate([camera_square, ai_square], axis=1)
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


class VideoRecorder:
    """mp4v video at a fixed rate, written in real time (frames repeated or skipped to match the clock),
    or with `every_frame`, exactly one video frame per displayed frame (deterministic; for tests and bench).

    Written under a hidden temporary name and renamed on `close`, so the final name never holds a
    half-written file; `close` runs on every exit path.
    """

    def __init__(self, path: str | Path, fps: float, log: TextIO | None = None, every_frame: bool = False):
        self.path = Path(path)
        self.every_frame = every_frame
        if self.path.suffix.lower() not in RECORD_SUFFIXES:
            raise OutputError(f"--record {self.path}: use a {'/'.join(RECORD_SUFFIXES)} file name (mp4v video)")
        self.fps = fps if fps > 0 else 30.0
        self.partial = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self.frames_written = 0
        self._writer: cv2.VideoWriter | None = None
        self._start: float | None = None
        self._log = log if log is not None else sys.stderr
        if not self.path.parent.is_dir():
            raise OutputError(f"--record {self.path}: folder {self.path.parent} does not exist")

    def write(self, frame: np.ndarray, now: float) -> None:
        if self._writer is None:
            height, width = frame.shape[:2]
            writer = cv2.VideoWriter(str(self.partial), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (width, height))
            if not writer.isOpened():
                raise OutputError(f"--record {self.path}: OpenCV cannot write mp4v video to {self.partial}")
            self._writer = writer
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
        self._writer.release()
        self._writer = None
        os.replace(self.partial, self.path)
        print(f"mlx-sdxs: recorded {self.frames_written} frames ({self.frames_written / self.fps:.1f} s) "
              f"to {self.path}", file=self._log)


class FramesWriter:
    """Every displayed frame as a numbered PNG."""

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


class DisplayStage:
    """Composes and shows each result, applies the AI-image EMA and camera blend, handles the seed's keys.

    Keys: q/ESC quit · s save the AI image · n/p next/previous prompt · +/- camera blend · e/d EMA.
    """

    def __init__(self, *, output_size: int, prompts: Sequence[str], prompt_index: int = 0, blend: float = 0.0,
                 ema: float = 0.4, label: str | None = None, window: OpenCVWindow | None = None,
                 sinks: Sequence[Sink] = (), save_dir: str | Path = "captures", overlay: bool = True,
                 log: TextIO | None = None):
        self.output_size, self.prompts, self.prompt_index = output_size, list(prompts), prompt_index
        self.blend, self.ema, self.label = blend, ema, label
        self.window, self.sinks, self.save_dir, self.overlay = window, list(sinks), Path(save_dir), overlay
        self._log = log if log is not None else sys.stderr
        self._shown_ai: np.ndarray | None = None  # float32 EMA state at output size
        self.last_frame: np.ndarray | None = None

    def status_lines(self, control: LoopControl) -> list[str]:
        stats = control.stats
        prompt = self.prompts[self.prompt_index] if self.prompts else ""
        return [
            f"AI: {stats.ai_rate.rate():.1f} FPS | Display: {stats.display_rate.rate():.1f} FPS | "
            f"Prompt {self.prompt_index + 1}/{len(self.prompts)}: {prompt}",
            f"blend {self.blend:.1f} | ema {self.ema:.1f} | q quit  s save  n/p prompt  +/- blend  e/d ema",
        ]

    def smooth(self, ai: np.ndarray) -> np.ndarray:
        """shown = ema·previous_shown + (1 − ema)·new, at output size."""
        new = center_crop_resize(ai, self.output_size)
        if self._shown_ai is None or self.ema <= 0:
            self._shown_ai = new.astype(np.float32)
            return new
        self._shown_ai = self.ema * self._shown_ai + (1.0 - self.ema) * new
        return np.clip(self._shown_ai + 0.5, 0, 255).astype(np.uint8)

    def present(self, result: Result, control: LoopControl) -> None:
        now = time.perf_counter()
        ai = self.smooth(result.ai)
        lines = self.status_lines(control) if self.overlay else ()
        frame = compose_frame(result.camera, ai, self.output_size, blend=self.blend, lines=lines, banner=self.label)
        self.last_frame = frame
        for sink in self.sinks:
            sink.write(frame, now)
        if self.window is not None:
            self.window.show(frame)
            self.handle_key(self.window.poll_key(), control)

    def idle(self, control: LoopControl) -> None:
        if self.window is not None:
            self.handle_key(self.window.poll_key(), control)

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
            control.set_prompt(self.prompts[self.prompt_index])
        elif char in ("+", "="):
            self.blend = min(1.0, round(self.blend + BLEND_STEP, 2))
        elif char in ("-", "_"):
            self.blend = max(0.0, round(self.blend - BLEND_STEP, 2))
        elif char == "e":
            self.ema = min(EMA_MAX, round(self.ema + EMA_STEP, 2))
        elif char == "d":
            self.ema = max(0.0, round(self.ema - EMA_STEP, 2))

    def save(self) -> Path | None:
        """The AI half as shown (EMA applied, no overlays) to a timestamped PNG in `save_dir`."""
        if self._shown_ai is None:
            return None
        self.save_dir.mkdir(parents=True, exist_ok=True)
        path = self.save_dir / f"mlx-sdxs-{datetime.now():%Y%m%d-%H%M%S-%f}.png"
        if not cv2.imwrite(str(path), np.clip(self._shown_ai + 0.5, 0, 255).astype(np.uint8)):
            raise OutputError(f"cannot write {path}")
        print(f"mlx-sdxs: saved {path}", file=self._log)
        return path

    def close(self) -> None:
        """Finalise every output, even if one of them fails (the first failure is re-raised)."""
        failure: BaseException | None = None
        for closer in [sink.close for sink in self.sinks] + ([self.window.close] if self.window else []):
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 — finish the others, then report
                failure = failure or exc
        if failure is not None:
            raise failure

"""The display stage: what each tick shows — camera | AI side by side with the demo's overlays, the AI image
eased towards the newest result (EMA) with the camera blended in — handed to every output, and the keys,
turned into knob requests. Knob values are read from the live state on every tick, never kept here.

Runs on the main thread, once per display tick (the capture rate); with no output that takes frames it
draws nothing (`draws`) and only reads keys and updates the status line.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Sequence, TextIO

import cv2
import numpy as np

from mlx_sdxs.camera.loop import Tick
from mlx_sdxs.camera.outputs import (AI_VIEW, CAMERA_VIEW, DISPLAY_VIEW, SAVE_DIR, OpenCVWindow, OutputError, Sink,
                                     StatusLine)
from mlx_sdxs.camera.state import LiveState, LoopControl
from mlx_sdxs.frames import fit
from mlx_sdxs.knobs import KNOBS, Knob

FONT = cv2.FONT_HERSHEY_SIMPLEX
KEY_ESC = 27
#: Keys a knob also answers to: the same key without Shift on a US keyboard.
KEY_ALIASES = {"=": "+", "_": "-"}


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


def labelled(image: np.ndarray, label: str | None) -> np.ndarray:
    """A copy stamped with `label` (random-weight outputs say so), or `image` itself without one."""
    return draw_banner(image.copy(), label) if label else image


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



def _tiled(frame: np.ndarray, others: Sequence[np.ndarray | None]) -> np.ndarray:
    """`frame` with the other streams' frames (each fitted to its width) under it; a stream with none yet is left out."""
    rows = [frame] + [cv2.resize(other, (frame.shape[1], max(1, round(other.shape[0] * frame.shape[1] / other.shape[1]))))
                      for other in others if other is not None]
    return rows[0] if len(rows) == 1 else np.concatenate(rows, axis=0)


def _shown(state: LiveState) -> list[Knob]:
    """The number knobs the overlay shows and the keys turn: those this session has (a prompt blend once there
    is a prompt B to blend with)."""
    return [knob for knob in KNOBS.values() if knob.kind == "number" and state.has(knob)
            and (knob.name != "prompt_blend" or state.prompt_b)]


def status_lines(state: LiveState) -> list[str]:
    """The overlay's lines: rates and the prompt, then every number knob this session has, then the keys."""
    live = state.stats
    index, count = state.prompt_index, len(state.gallery)
    place = f"{index + 1}/{count}" if index >= 0 else f"-/{count}"
    shown = _shown(state)
    values = [f"{knob.words} {state.control + ' ' if knob.name == 'control_strength' else ''}"
              f"{getattr(state, knob.name):.2f}" for knob in shown]
    keys = "  ".join(f"{k.keys[1]}/{k.keys[0]} {k.words}" for k in shown if k.keys)
    return [
        f"AI: {live.get('ai_fps', 0.0):.1f} FPS | Display: {live.get('display_fps', 0.0):.1f} FPS | "
        f"Prompt {place}: {state.prompt}",
        " | ".join(values),
        f"q quit  s save  n/p prompt  {keys}",
    ]


class Presenter:
    """Keys: q/ESC quit · s save the AI image · n/p next/previous gallery prompt · and each knob's own pair
    from the knob table (+/- camera blend, e/d EMA, [/] prompt A↔B, ,/. seed A↔B, c/v control strength)."""

    def __init__(self, *, output_size: int, window: OpenCVWindow | None = None, sinks: Sequence[Sink] = (),
                 status: StatusLine | None = None, save_dir: str | Path = SAVE_DIR, overlay: bool = True,
                 log: TextIO | None = None):
        self.output_size, self.window, self.sinks = output_size, window, list(sinks)
        self.status, self.save_dir, self.overlay = status, Path(save_dir), overlay
        self._log = log if log is not None else sys.stderr
        self._shown_ai: np.ndarray | None = None  # float32 EMA state at the render size
        self.last_frame: np.ndarray | None = None
        self.last_ai_view: np.ndarray | None = None
        #: Other streams' display views (their newest frame each), shown under this one's in the window.
        self.tiles: list = []

    @property
    def draws(self) -> bool:
        """Whether any output takes frames (a window or a sink); headless with only a status line, none does."""
        return self.window is not None or bool(self.sinks)

    def smooth(self, ai: np.ndarray, ema: float) -> np.ndarray:
        """One EMA step: shown = ema·previous_shown + (1 − ema)·newest, at the AI image's size."""
        if self._shown_ai is None or ema <= 0 or self._shown_ai.shape != ai.shape:
            self._shown_ai = ai.astype(np.float32)
            return ai
        self._shown_ai = ema * self._shown_ai + (1.0 - ema) * ai
        return np.clip(self._shown_ai + 0.5, 0, 255).astype(np.uint8)

    def present(self, tick: Tick, control: LoopControl) -> None:
        if not self.draws:
            self.idle(control)
            return
        state = control.state
        now = time.perf_counter()
        ai = self.smooth(tick.result.ai, state.ema)
        camera = fit(tick.camera, (ai.shape[1], ai.shape[0]))
        if state.blend > 0:
            ai = cv2.addWeighted(ai, 1.0 - state.blend, camera, state.blend, 0.0)
        ai_view = draw_banner(ai.copy(), state.label) if state.label else ai
        frame = None  # the whole window's view, composed only for a window or an output that takes it
        if self.window is not None or any(sink.view == DISPLAY_VIEW for sink in self.sinks):
            lines = status_lines(state) if self.overlay else ()
            frame = compose_frame(camera, ai, self.output_size, lines=lines, banner=state.label)
        self.last_frame, self.last_ai_view = frame, ai_view
        views = {AI_VIEW: ai_view, DISPLAY_VIEW: frame, CAMERA_VIEW: camera}
        for sink in self.sinks:
            sink.write(views[sink.view], now)
        if self.window is not None:
            self.window.show(_tiled(frame, [tile.latest_frame() for tile in self.tiles]))
        self.idle(control)

    def idle(self, control: LoopControl) -> None:
        if self.window is not None:
            self.handle_key(self.window.poll_key(), control)
        if self.status is not None:
            self.status.update(control.state)

    def handle_key(self, key: int, control: LoopControl) -> None:
        if key < 0:
            return
        char = chr(key).lower() if key < 256 else ""
        char = KEY_ALIASES.get(char, char)
        state = control.state
        if key == KEY_ESC or char == "q":
            control.quit()
        elif char == "s":
            self.save()
        elif char in ("n", "p") and state.gallery:
            step = 1 if char == "n" else -1
            index = state.prompt_index if state.prompt_index >= 0 else (-1 if step == 1 else 0)
            control.request(prompt=state.gallery[(index + step) % len(state.gallery)])
        else:
            for knob in _shown(state):
                if knob.keys and char in knob.keys:
                    control.request(**{knob.name: knob.stepped(control.wanted(knob.name), char == knob.keys[1])})

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


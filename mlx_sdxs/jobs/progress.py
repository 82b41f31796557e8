"""A progress bar with rate and ETA on stderr: redrawn in place on a terminal, a line every few seconds
otherwise (logs, CI), and a last line when the job ends."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """`done` of `total` units (images, frames) of a job; `skipped` were finished by an earlier run."""

    WIDTH = 24

    def __init__(self, total: int, unit: str, skipped: int = 0, stream: TextIO | None = None,
                 every_s: float | None = None):
        self.total, self.unit, self.skipped = total, unit, skipped
        self.done = skipped
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s if every_s is not None else (0.2 if self.tty else 5.0)
        self.detail = ""
        self._start = time.perf_counter()
        self._next = 0.0

    @property
    def rate(self) -> float:
        """Units per second made by this run (skipped ones excluded)."""
        elapsed = time.perf_counter() - self._start
        return (self.done - self.skipped) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        fraction = self.done / self.total if self.total else 1.0
        filled = int(fraction * self.WIDTH)
        rate = self.rate
        eta = clock((self.total - self.done) / rate) if rate > 0 else "?"
        detail = f" | {self.detail}" if self.detail else ""
        return (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total} {self.unit} "
                f"{100 * fraction:3.0f}% | {rate:.2f} {self.unit}/s | ETA {eta}{detail}")

    def advance(self, count: int = 1, detail: str | None = None) -> None:
        self.set(self.done + count, detail)

    def set(self, done: int, detail: str | None = None) -> None:
        self.done = min(self.total, done)
        if detail is not None:
            self.detail = detail
        now = time.perf_counter()
        if now >= self._next or self.done == self.total:
            self._next = now + self.every_s
            self._draw()

    def note(self, text: str) -> None:
        """A line of its own above the bar (a file finished)."""
        self.stream.write(("\r\x1b[2K" if self.tty else "") + f"mlx-sdxs: {text}\n")
        if self.tty:
            self._draw()
        self.stream.flush()

    def _draw(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line())
        else:
            self.stream.write(f"mlx-sdxs: {self.line()}\n")
        self.stream.flush()

    def close(self, summary: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K")
        self.stream.write(f"mlx-sdxs: {summary} in {clock(time.perf_counter() - self._start)}\n")
        self.stream.flush()

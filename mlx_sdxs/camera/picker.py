"""Sources that change while the loop runs: frames pushed in from elsewhere (the studio page's webcam,
over its WebSocket) and the studio's source picker, which switches between sources without a restart."""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from mlx_sdxs.camera.slots import LatestSlot
from mlx_sdxs.camera.sources import DEFAULT_FPS, FrameSource
from mlx_sdxs.errors import SourceError

#: How often a waiting `read` re-checks its stop event (frames and `close` wake it at once).
STOP_CHECK_S = 0.1
#: The studio page's sources, whose frames it pushes: its webcam, and its drawing canvas (a sketch: dark strokes
#: on light, the Sketch ControlNet's input once inverted).
BROWSER_SOURCE, DRAW_SOURCE = "browser", "draw"
PUSHED_SOURCES = (BROWSER_SOURCE, DRAW_SOURCE)


def control_mode_for(source: str | None) -> str:
    """How a source's frames become a ControlNet's image: a drawing is a sketch; a camera's frames give edges."""
    return "sketch" if source == DRAW_SOURCE else "edges"


class BrowserSource:
    """Frames pushed in (`push`): the newest one wins, an unread one is replaced, never queued. `read` waits
    for a frame newer than the last it returned."""

    def __init__(self, fps: float = DEFAULT_FPS, name: str = "browser webcam"):
        self.fps, self.name = fps, name
        self._slot: LatestSlot[np.ndarray] = LatestSlot()
        self._read_seq = 0

    @property
    def received(self) -> int:
        return self._slot.seq

    def push(self, frame: np.ndarray) -> None:
        self._slot.put(frame)

    def read(self, stop: threading.Event | None = None) -> np.ndarray | None:
        while stop is None or not stop.is_set():
            taken = self._slot.take_newer(self._read_seq, STOP_CHECK_S)
            if taken is not None:
                self._read_seq, frame = taken
                return frame
            if self._slot.closed:
                return None
        return None

    def close(self) -> None:
        self._slot.close()


class SwitchableSource:
    """The studio's source picker: one of several named sources feeds the loop, switchable while it runs.
    Sources are opened when first picked (a camera that fails to open leaves the current one in place)."""

    def __init__(self, openers: dict[str, Callable[[], FrameSource]], initial: str, fps: float = DEFAULT_FPS):
        self._openers, self.fps = openers, fps
        self._open: dict[str, FrameSource] = {}
        self._lock = threading.Lock()
        self.current = ""
        self.switch(initial)

    @property
    def choices(self) -> list[str]:
        return list(self._openers)

    @property
    def name(self) -> str:
        return self.current

    def switch(self, choice: str) -> None:
        """Make `choice` the source; SourceError (and the current source kept) if it cannot open."""
        if choice not in self._openers:
            raise SourceError(f"no source {choice!r} (choose from {', '.join(self._openers)})")
        with self._lock:
            if choice not in self._open:
                self._open[choice] = self._openers[choice]()
            self.current = choice

    def get(self, choice: str) -> FrameSource | None:
        return self._open.get(choice)

    def read(self, stop: threading.Event | None = None) -> np.ndarray | None:
        while stop is None or not stop.is_set():
            with self._lock:
                choice = self.current
                source = self._open[choice]
            frame = source.read(_Either(stop, lambda: self.current != choice))
            if frame is not None or self.current == choice:
                return frame
        return None

    def close(self) -> None:
        with self._lock:
            for source in self._open.values():
                source.close()
            self._open.clear()


class _Either:
    """A stop event that is also set when `changed()` says the picked source changed."""

    def __init__(self, stop: threading.Event | None, changed: Callable[[], bool]):
        self._stop, self._changed = stop, changed

    def is_set(self) -> bool:
        return (self._stop is not None and self._stop.is_set()) or self._changed()

    def wait(self, timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while not self.is_set():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return False
            if self._stop is not None:
                self._stop.wait(min(remaining, 0.05))
            else:
                time.sleep(min(remaining, 0.05))
        return True

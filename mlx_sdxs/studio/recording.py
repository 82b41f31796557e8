"""The studio's recordings: the AI view as shown, recorded while the page asks for it."""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path

import numpy as np

from mlx_sdxs.camera.outputs import AI_VIEW, VideoRecorder


class RecordingSink:
    """A display sink that records the AI view while the page asks it to; start/stop from the server
    thread, frames from the display thread, one lock between them."""

    view = AI_VIEW

    def __init__(self, folder: Path, fps: float, log):
        self.folder, self.fps, self._log = folder, fps, log
        self._lock = threading.Lock()
        self._recorder: VideoRecorder | None = None
        self.finished: list[str] = []

    @property
    def active(self) -> bool:
        return self._recorder is not None

    def start(self) -> str:
        with self._lock:
            if self._recorder is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                path = self.folder / f"mlx-sdxs-{datetime.now():%Y%m%d-%H%M%S}.mp4"
                self._recorder = VideoRecorder(path, self.fps, log=self._log)
            return self._recorder.path.name

    def stop(self) -> str | None:
        with self._lock:
            recorder, self._recorder = self._recorder, None
            if recorder is None:
                return None
            recorder.close()
            if recorder.frames_written == 0:
                return None
            self.finished.append(recorder.path.name)
            return recorder.path.name

    def write(self, frame: np.ndarray, now: float) -> None:
        with self._lock:
            if self._recorder is not None:
                self._recorder.write(frame, now)

    def close(self) -> None:
        self.stop()

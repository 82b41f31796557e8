"""Latest-frame hand-out from the presenter to any number of viewers (the studio page, /stream.mjpg).

A display sink: `write` keeps only the newest frame (a `LatestSlot`, no queue), and a viewer asks for
"anything newer than what I have", so a slow viewer skips frames instead of slowing the loop or growing
memory. Frames are JPEG-encoded lazily, once per frame, by the first viewer that wants it: no viewers,
no cost. Viewers wait from threads (`next`) or from an asyncio loop (`next_async`).
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from mlx_sdxs.camera.slots import LatestSlot


class Broadcast:
    def __init__(self, view: str, quality: int = 80):
        self.view, self.quality = view, quality
        self._slot: LatestSlot[np.ndarray] = LatestSlot()
        self._encode_lock = threading.Lock()
        self._jpeg: tuple[int, bytes] | None = None

    # --- the display sink ----------------------------------------------------------------------
    def write(self, frame: np.ndarray, now: float = 0.0) -> None:
        self._slot.put(frame)

    def close(self) -> None:
        self._slot.close()

    # --- viewers -------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._slot.closed

    @property
    def seq(self) -> int:
        return self._slot.seq

    def latest_frame(self) -> np.ndarray | None:
        return self._slot.latest()

    def _encoded(self, taken: tuple[int, np.ndarray] | None) -> tuple[int, bytes] | None:
        if taken is None or self.closed:
            return None
        seq, frame = taken
        with self._encode_lock:
            if self._jpeg is None or self._jpeg[0] != seq:
                ok, encoded = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
                self._jpeg = (seq, encoded.tobytes() if ok else b"")
            return self._jpeg

    def next(self, after_seq: int, timeout: float) -> tuple[int, bytes] | None:
        """The newest JPEG with seq > after_seq, waiting up to `timeout`; None on timeout or close."""
        return self._encoded(self._slot.wait_newer(after_seq, timeout))

    async def next_async(self, after_seq: int, timeout: float) -> tuple[int, bytes] | None:
        """`next` for a coroutine."""
        return self._encoded(await self._slot.wait_newer_async(after_seq, timeout))

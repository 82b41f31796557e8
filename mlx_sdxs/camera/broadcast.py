"""Latest-frame hand-out from the display stage to any number of viewers (the studio page, /stream.mjpg).

A display sink: `write` keeps only the newest frame (no queue), and a viewer asks for "anything newer
than what I have", so a slow viewer skips frames instead of slowing the loop or growing memory.
Frames are JPEG-encoded lazily, once per frame, by the first viewer that wants it: no viewers, no cost.
Viewers wait from threads (`next`) or from an asyncio loop (`next_async`).
"""

from __future__ import annotations

import asyncio
import threading

import cv2
import numpy as np


class Broadcast:
    def __init__(self, view: str, quality: int = 80):
        self.view, self.quality = view, quality
        self._cond = threading.Condition()
        self._frame: np.ndarray | None = None
        self._jpeg: bytes | None = None
        self._seq = 0
        self._closed = False
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    # --- the display sink ----------------------------------------------------------------------
    def write(self, frame: np.ndarray, now: float = 0.0) -> None:
        with self._cond:
            self._frame, self._jpeg = frame, None
            self._seq += 1
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    # --- viewers -------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def seq(self) -> int:
        return self._seq

    def latest_frame(self) -> np.ndarray | None:
        return self._frame

    def _encoded(self) -> tuple[int, bytes] | None:
        with self._cond:
            if self._frame is None:
                return None
            if self._jpeg is None:
                ok, encoded = cv2.imencode(".jpg", self._frame, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
                self._jpeg = encoded.tobytes() if ok else b""
            return self._seq, self._jpeg

    def next(self, after_seq: int, timeout: float) -> tuple[int, bytes] | None:
        """The newest JPEG with seq > after_seq, waiting up to `timeout`; None on timeout or close."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > after_seq or self._closed, timeout)
            if self._closed or self._seq <= after_seq:
                return None
        return self._encoded()

    async def next_async(self, after_seq: int, timeout: float) -> tuple[int, bytes] | None:
        """`next` for a coroutine: waits on an asyncio event the writer sets from its thread."""
        if self._seq <= after_seq and not self._closed:
            waiter = (asyncio.get_running_loop(), asyncio.Event())
            with self._cond:
                self._waiters.add(waiter)
            try:
                if self._seq <= after_seq and not self._closed:
                    await asyncio.wait_for(waiter[1].wait(), timeout)
            except asyncio.TimeoutError:
                return None
            finally:
                with self._cond:
                    self._waiters.discard(waiter)
        if self._closed or self._seq <= after_seq:
            return None
        return self._encoded()

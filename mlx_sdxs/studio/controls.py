"""What the studio page may send and what it is told: JSON controls become knob requests on the session's
`LoopControl` (or the source picker's and the recorder's actions), webcam frames are checked before they
are decoded, and the status is the session's live state plus the studio's own figures. A bad message is
dropped and counted, never a crash."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import cv2
import numpy as np

from mlx_sdxs.camera.picker import PUSHED_SOURCES, BrowserSource, SwitchableSource, control_mode_for
from mlx_sdxs.camera.state import LoopControl
from mlx_sdxs.camera.stats import LoopStats
from mlx_sdxs.errors import SDXSError
from mlx_sdxs.frames import MIN_SIDE
from mlx_sdxs.imageio import header_size
from mlx_sdxs.knobs import KNOBS, PROMPT_KNOBS
from mlx_sdxs.studio.recording import RecordingSink

#: Largest incoming frame: bytes of JPEG, and pixels once its header is read (before decoding).
MAX_FRAME_BYTES = 4 << 20
MAX_FRAME_PIXELS = 4096 * 4096
#: The figures before the first frame (zeros), so the page always finds every field.
NO_FIGURES = LoopStats().live()


class Controls:
    """One stream's: the host's (with its recorder), or a visitor's own (`recordings` None: nothing to record)."""

    def __init__(self, control: LoopControl, source: SwitchableSource, recordings: RecordingSink | None,
                 dropped: Counter):
        self.control, self.source, self.recordings, self.dropped = control, source, recordings, dropped

    def status(self) -> dict[str, Any]:
        state = self.control.state
        knobs = state.knobs()
        return {**NO_FIGURES, **state.stats, **knobs, "knobs": list(knobs),
                "backend": state.backend, "label": state.label, "render_size": list(state.render_size),
                "gallery": list(state.gallery), "note": state.note,
                "source": self.source.current, "sources": self.source.choices,
                "frames_received": sum(source.received for source in map(self.source.get, PUSHED_SOURCES)
                                       if isinstance(source, BrowserSource)),
                "dropped_messages": dict(self.dropped),
                "recording": self.recordings is not None and self.recordings.active,
                "recordings": list(self.recordings.finished) if self.recordings is not None else []}

    def handle_text(self, text: str) -> dict[str, Any] | None:
        """One JSON control; the reply to send back, if any. Malformed or out-of-range ones are counted."""
        try:
            message = json.loads(text)
            return self.handle(message)
        except (SDXSError, ValueError, TypeError, AttributeError) as exc:
            self.dropped["bad control"] += 1
            return {"type": "error", "message": str(exc)} if isinstance(exc, SDXSError) else None

    def handle(self, message: dict[str, Any]) -> dict[str, Any] | None:
        kind = message.get("type")
        if kind in ("prompt", "settings"):  # a prompt message carries the prompts, a settings message the rest
            names = PROMPT_KNOBS if kind == "prompt" else [k for k in KNOBS if k not in ("prompt", "prompt_b")]
            self.control.request(**{k: message[k] for k in names if k in message})
            return None
        if kind == "source":
            choice = str(message.get("source"))
            self.source.switch(choice)
            if self.control.state.controlled:
                self.control.request(control=control_mode_for(choice))
            return None
        if kind == "record":
            if message.get("action") == "start":
                return {"type": "recording", "started": self.recordings.start()}
            name = self.recordings.stop()
            return {"type": "recording", "finished": name, "url": f"/recordings/{name}" if name else None}
        raise ValueError(f"unknown control {kind!r}")

    def accept_frame(self, data: bytes) -> bool:
        """A JPEG from the page's webcam, checked before decoding; False (and counted) when dropped."""
        reason = None
        if len(data) > MAX_FRAME_BYTES:
            reason = "too large"
        else:
            size = header_size(data[:65536])
            if size is None:
                reason = "not a JPEG/PNG"
            elif size[0] * size[1] > MAX_FRAME_PIXELS or min(size) < MIN_SIDE:
                reason = "bad size"
        frame = None
        if reason is None:
            frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if frame is None or frame.ndim != 3:
                reason = "undecodable"
        if reason is not None:
            self.dropped[reason] += 1
            return False
        pushed = self.source.get(self.source.current)
        if isinstance(pushed, BrowserSource):  # the page's webcam or canvas, whichever is on
            pushed.push(frame)
        return True

"""A camera loop beside a session's own: its own source, knobs, live state, stats and outputs, on its own
thread, sharing the session's device through a stream of its batch (`Backend.open_stream`). The `camera`
command runs one per extra `--source`; the studio one per visitor."""

from __future__ import annotations

import threading

from mlx_sdxs.backends.base import Backend
from mlx_sdxs.camera.loop import run_loop
from mlx_sdxs.camera.presenter import Presenter
from mlx_sdxs.camera.sources import FrameSource
from mlx_sdxs.camera.state import LiveState, LoopControl

#: How long a side stream's loop may take to stop (a frame in flight on a CPU can take seconds).
STOP_S = 30.0


def side_control(host: LoopControl) -> LoopControl:
    """A new stream's live state: the session's facts, and the host's newest knob values to start from (its first
    prompt may still be on its way to the model: then the gallery's first)."""
    state = host.state
    control = LoopControl(LiveState(gallery=state.gallery, render_size=state.render_size, controlled=state.controlled,
                                    has_seed_b=state.has_seed_b, backend=state.backend, label=state.label))
    knobs = {name: host.wanted(name) for name in state.knobs()}
    knobs = {name: value for name, value in knobs.items() if value is not None}
    knobs["prompt"] = knobs.get("prompt") or state.gallery[0]
    control.request(**knobs)
    return control


class SideStream:
    """`run_loop(source, backend, presenter)` on a thread from `start` until `close`; `error` holds what stopped it."""

    def __init__(self, source: FrameSource, backend: Backend, control: LoopControl, presenter: Presenter,
                 name: str = "sdxs-side"):
        self.source, self.backend, self.control, self.presenter = source, backend, control, presenter
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            run_loop(self.source, self.backend, self.presenter, control=self.control)
        except BaseException as error:  # noqa: BLE001 — reported by the owner; the session goes on
            self.error = error

    def close(self) -> None:
        """Stop the loop (its source closes, so no stage waits), close its outputs, leave the batch. Idempotent."""
        self.control.quit()
        self.source.close()
        if self._thread.is_alive():
            self._thread.join(STOP_S)
        try:
            self.presenter.close()
        finally:
            self.backend.close()

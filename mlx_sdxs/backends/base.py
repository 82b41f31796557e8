"""What the camera loop, the studio and the bench need from an inference backend — all of it: nothing above
reads a backend's other attributes.

Every backend is a `mlx_sdxs.recipe.Recipe` on one engine (MLX, torch, ONNX Runtime, CoreML); the
loop knows only this protocol, so a test double or another runtime can stand in.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    """An img2img stream the 3-thread loop can drive. Nothing in the loop knows which one runs."""

    name: str
    #: Shown on every output when set (random-weight models say so).
    label: str | None
    #: (width, height) of the frames `process` returns.
    render_size: tuple[int, int]
    #: Whether the model has a ControlNet: then each frame also becomes its control image (`set_control_mode`).
    controlled: bool
    #: When True, `process` synchronises at stage boundaries and fills `last_stage_ms` per stage (the bench);
    #: otherwise `last_stage_ms` holds the host work and the whole frame ("host", "frame").
    profile_stages: bool
    last_stage_ms: dict[str, float]

    def set_prompt(self, prompt: str, prompt_b: str | None = None, blend: float | None = None) -> tuple[str, ...]:
        """Target a new prompt (or the slerp to `prompt_b` at `blend`; an empty `prompt_b` drops it); the first
        call sets it at once, later ones morph towards it frame by frame. Returns the prompts the text encoder
        cut off (it reads a fixed number of tokens)."""

    def set_prompt_blend(self, blend: float) -> None:
        """Move the conditioning along the slerp from prompt A to prompt B."""

    def set_feedback(self, feedback: float) -> None: ...

    def set_seed_blend(self, blend: float) -> None:
        """Move the fixed noise along the slerp from the first random seed's to the second's."""

    def set_control_mode(self, mode: str) -> None:
        """How frames become the ControlNet's image (`frames.CONTROL_MODES`)."""

    def set_control_strength(self, strength: float) -> None: ...

    def worker(self) -> AbstractContextManager:
        """Context for the thread that will make every other call (MLX: a stream that thread owns)."""

    def warmup(self) -> None:
        """Run enough frames that the first real frame pays no compile/allocation cost."""

    def submit(self, frame_bgr: np.ndarray) -> object:
        """Start one camera frame (uint8 BGR, any size) without waiting for the device; returns a handle
        for `collect`. The next `submit` may come before this frame's `collect` (one frame in flight)."""

    def collect(self, pending: object) -> np.ndarray:
        """The stylised frame (uint8 BGR, render size) of a submitted one; waits for it."""

    def process(self, frame_bgr: np.ndarray) -> np.ndarray:
        """`collect(submit(frame_bgr))`."""

    def close(self) -> None:
        """Release models/devices; idempotent."""

    # Optional: `open_stream() -> Backend`, another stream in this backend's batch with the same settings, its
    # frames run in one batched step with this one's (`backends.batcher`: the studio's visitors).

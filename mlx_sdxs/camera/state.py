"""One live state per session: the knobs a user turns and what the loop reports, as one immutable snapshot
(`LiveState`) that every reader shows — the presenter's overlay, the status line, the studio and each of
its viewers — and one way to change a knob: a request on `LoopControl`, from keys, the studio or the
command line's initial values alike.

Model knobs (prompts, blends, feedback, the noise blend) are the inference thread's: it hands them to the
backend before its next frame and only then publishes them, so the state shows what the frames use.
Display knobs (camera blend, EMA) touch no model: they are published at once and the next tick uses them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from mlx_sdxs.camera.stats import LoopStats
from mlx_sdxs.errors import ConfigError
from mlx_sdxs.recipe import MAX_CONTROL_STRENGTH, check_control, check_fraction

MODEL_KNOBS = ("prompt", "prompt_b", "prompt_blend", "feedback", "seed_blend", "control", "control_strength")
DISPLAY_KNOBS = ("blend", "ema")
#: The EMA's ceiling: at 1 the shown image would never change again.
EMA_MAX = 0.95
MAX_PROMPT_CHARS = 2000


@dataclass(frozen=True)
class LiveState:
    """What the session is doing now. Model knobs are the values the backend uses; `seed_blend` is None in a
    session without a second random seed, `control` (how frames become the ControlNet's image) and
    `control_strength` in one without a ControlNet."""

    prompt: str = ""
    prompt_b: str | None = None
    prompt_blend: float = 0.0
    feedback: float = 0.0
    seed_blend: float | None = None
    control: str | None = None
    control_strength: float | None = None
    blend: float = 0.0
    ema: float = 0.0
    backend: str = ""
    label: str | None = None
    render_size: tuple[int, int] = (0, 0)
    gallery: tuple[str, ...] = ()
    #: About the newest prompt (e.g. that the text encoder cut it off).
    note: str = ""
    #: `LoopStats.live()` when the state was published.
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_index(self) -> int:
        """The prompt's place in the gallery, -1 when it is not one of them."""
        return self.gallery.index(self.prompt) if self.prompt in self.gallery else -1


def checked(state: LiveState, changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` to knobs, each value checked (ConfigError naming the knob), prompts trimmed."""
    unknown = set(changes) - set(MODEL_KNOBS) - set(DISPLAY_KNOBS)
    if unknown:
        raise ConfigError(f"unknown knob(s): {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for knob, value in changes.items():
        if knob in ("prompt", "prompt_b"):
            text = str(value if value is not None else "")[:MAX_PROMPT_CHARS].strip()
            if knob == "prompt" and not text:
                raise ConfigError("the prompt is empty")
            out[knob] = text
        elif knob == "seed_blend" and state.seed_blend is None:
            raise ConfigError("a seed blend needs a second random seed (--seed-b)")
        elif knob in ("control", "control_strength") and state.control is None:
            raise ConfigError(f"{knob.replace('_', ' ')} needs a model with a ControlNet "
                              "(e.g. --model sdxs-512-dreamshaper-sketch)")
        elif knob == "control":
            check_control(value, None)
            out[knob] = value
        elif knob == "control_strength":
            out[knob] = check_fraction(value, "control strength", MAX_CONTROL_STRENGTH)
        else:
            out[knob] = check_fraction(value, knob.replace("_", " "), EMA_MAX if knob == "ema" else 1.0)
    return out


class LoopControl:
    """Knob requests into a running loop, its published state out, and quitting. Also owns the session's
    counters, so they survive an exception out of the loop."""

    def __init__(self, state: LiveState | None = None) -> None:
        self.stats = LoopStats()
        self._state = state or LiveState()
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._quit = threading.Event()
        self._wake: Callable[[], None] | None = None

    @property
    def state(self) -> LiveState:
        return self._state

    def request(self, **changes: Any) -> None:
        """Change knobs: display knobs now, model knobs at the inference thread's next frame (newest value per
        knob). Bad values raise ConfigError and change nothing."""
        with self._lock:
            valid = checked(self._state, changes)
            display = {k: v for k, v in valid.items() if k in DISPLAY_KNOBS}
            if display:
                self._state = replace(self._state, **display)
            self._pending.update({k: v for k, v in valid.items() if k in MODEL_KNOBS})
            wake = self._wake if self._pending else None
        if wake is not None:
            wake()

    def take_requests(self) -> dict[str, Any]:
        """The model knobs requested since the last call (the inference thread's)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            return pending

    @property
    def has_requests(self) -> bool:
        return bool(self._pending)

    def on_request(self, wake: Callable[[], None] | None) -> None:
        """Call `wake` whenever model knobs are requested (the inference thread waits on frames with it)."""
        self._wake = wake

    def publish(self, **fields: Any) -> LiveState:
        """Replace fields of the state (the loop's: applied knobs, session facts, figures)."""
        with self._lock:
            self._state = replace(self._state, **fields)
            return self._state

    def publish_stats(self) -> None:
        self.publish(stats=self.stats.live())

    def quit(self) -> None:
        self._quit.set()

    @property
    def quit_requested(self) -> bool:
        return self._quit.is_set()

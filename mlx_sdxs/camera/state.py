"""One live state per session: the knobs a user turns and what the loop reports, as one immutable snapshot
(`LiveState`) that every reader shows — the presenter's overlay, the status line, the studio and each of
its viewers — and one way to change a knob: a request on `LoopControl`, from keys, the studio or the
command line's initial values alike.

The knobs are declared once, in `mlx_sdxs.knobs`. Those that act on the recipe or the similarity gate are the
inference thread's: it hands them over before its next frame and only then publishes them, so the state shows
what the frames use. Display knobs (camera blend, EMA) touch no model: they are published at once and the next
tick uses them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from mlx_sdxs.camera.stats import LoopStats
from mlx_sdxs.errors import ConfigError
from mlx_sdxs.knobs import DISPLAY_KNOBS, KNOBS, Knob


@dataclass(frozen=True)
class LiveState:
    """What the session is doing now: one field per knob of `knobs.TABLE` (model knobs are the values the
    backend uses), what the session has (`controlled`: a ControlNet, `has_seed_b`: a second random seed) and
    its facts and figures."""

    prompt: str = ""
    prompt_b: str | None = None
    prompt_blend: float = KNOBS["prompt_blend"].default
    feedback: float = KNOBS["feedback"].default
    seed_blend: float = KNOBS["seed_blend"].default
    control: str | None = None
    control_strength: float = KNOBS["control_strength"].default
    similarity_threshold: float = KNOBS["similarity_threshold"].default
    blend: float = KNOBS["blend"].default
    ema: float = KNOBS["ema"].default
    controlled: bool = False
    has_seed_b: bool = False
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

    def has(self, knob: Knob) -> bool:
        """Whether this session has `knob` (a ControlNet's knobs need one, the seed blend a second seed)."""
        return {"controlnet": self.controlled, "seed_b": self.has_seed_b}.get(knob.requires, True)

    def knobs(self) -> dict[str, Any]:
        """Every knob this session has, with its value."""
        return {knob.name: getattr(self, knob.name) for knob in KNOBS.values() if self.has(knob)}


def checked(state: LiveState, changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` to knobs, each value checked by its table entry (ConfigError naming the knob and its range)."""
    unknown = set(changes) - set(KNOBS)
    if unknown:
        raise ConfigError(f"unknown knob(s): {', '.join(sorted(unknown))} (knobs: {', '.join(KNOBS)})")
    out: dict[str, Any] = {}
    for name, value in changes.items():
        knob = KNOBS[name]
        if not state.has(knob):
            needs = {"controlnet": "a model with a ControlNet (e.g. sdxs-512-dreamshaper-sketch)",
                     "seed_b": "a second random seed (--seed-b)"}[knob.requires]
            raise ConfigError(f"{knob.words} needs {needs}")
        out[name] = knob.check(value)
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
            self._pending.update({k: v for k, v in valid.items() if k not in DISPLAY_KNOBS})
            wake = self._wake if self._pending else None
        if wake is not None:
            wake()

    def take_requests(self) -> dict[str, Any]:
        """The model knobs requested since the last call (the inference thread's)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            return pending

    def wanted(self, name: str) -> Any:
        """Knob `name`'s newest value: requested and not yet applied, else the state's (a key press steps from it)."""
        with self._lock:
            return self._pending.get(name, getattr(self._state, name))

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

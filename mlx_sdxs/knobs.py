"""The one table of a live session's knobs: each declared once, with its type, range, default, help text,
keys and label, and where it acts. Everything that shows or changes a knob is built from this table: the
command-line flags (their ranges in `--help`, checked by argparse before anything loads), the live check of
every request (`camera.state`), the presenter's keys and overlay, the studio's status and sliders, and OSC.

Where a knob acts:
    "recipe"     the model's stream, handed to the backend by the inference thread before its next frame
                 (`setter` names the Backend method; the prompts go together through `set_prompt`)
    "gate"       the inference thread's similarity gate
    "display"    the presenter: applied at the next display tick, no model involved

A new knob is one entry here plus the code where it acts (a Backend method for "recipe", the presenter for
"display"); `LiveState` has a field of the same name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_sdxs.errors import ConfigError
from mlx_sdxs.frames import CONTROL_MODES

#: Longest prompt text a request keeps (CLIP reads 77 tokens; this only bounds what a client can send).
MAX_PROMPT_CHARS = 2000


@dataclass(frozen=True)
class Knob:
    """One live knob. `kind` is "number", "text" or "choice"; `requires` names what a session must have for
    the knob to exist ("prompt_b" is not required: a blend may be set before prompt B arrives)."""

    name: str
    kind: str
    acts: str
    label: str
    help: str
    default: Any = None
    low: float = 0.0
    high: float = 1.0
    #: One key press or one slider notch.
    step: float = 0.05
    #: (down, up) keys of the camera window.
    keys: tuple[str, str] | None = None
    choices: tuple[str, ...] = ()
    #: "controlnet" (a model with a ControlNet) or "seed_b" (a second random seed); None: every session.
    requires: str | None = None
    #: The Backend method a "recipe" knob is handed to (None for the prompts, which go together).
    setter: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def words(self) -> str:
        return self.name.replace("_", " ")

    def check(self, value: Any) -> Any:
        """`value` as this knob takes it; a ConfigError naming the knob and its range otherwise."""
        if self.kind == "text":
            if value is not None and not isinstance(value, (str, int, float)):
                raise ConfigError(f"{self.words} must be text, got {type(value).__name__}")
            text = str(value if value is not None else "")[:MAX_PROMPT_CHARS].strip()
            if self.name == "prompt" and not text:
                raise ConfigError("the prompt is empty")
            return text
        if self.kind == "choice":
            if value not in self.choices:
                raise ConfigError(f"{self.words} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        if isinstance(value, bool):
            raise ConfigError(f"{self.words} must be a number in [{self.low:g}, {self.high:g}], got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.words} must be a number in [{self.low:g}, {self.high:g}], got {value!r}") from None
        if not self.low <= number <= self.high:  # NaN fails this too
            raise ConfigError(f"{self.words} must be in [{self.low:g}, {self.high:g}], got {value}")
        return number

    def stepped(self, value: float, up: bool) -> float:
        """`value` one step up or down, kept in range (a key press)."""
        moved = value + self.step if up else value - self.step
        return min(self.high, max(self.low, round(moved, 4)))

    def spec(self) -> dict[str, Any]:
        """What a client (the studio page, an OSC controller) needs to draw the knob."""
        return {"name": self.name, "kind": self.kind, "acts": self.acts, "label": self.label, "help": self.help,
                "low": self.low, "high": self.high, "step": self.step, "choices": list(self.choices),
                "keys": list(self.keys) if self.keys else None, "requires": self.requires}


TABLE: tuple[Knob, ...] = (
    Knob("prompt", "text", "recipe", "Prompt",
         "the style; a change morphs to it over ~60 frames (keys n/p: the gallery)"),
    Knob("prompt_b", "text", "recipe", "Prompt B",
         "a second prompt: the conditioning sits on the slerp between the two; empty drops it"),
    Knob("prompt_blend", "number", "recipe", "Prompt A ↔ B",
         "position between the prompt (0) and prompt B (1)", default=0.5, keys=("[", "]")),
    Knob("feedback", "number", "recipe", "Feedback",
         "latent feedback of the previous frame (0.1 as the SDXS camera demo)", default=0.1,
         setter="set_feedback"),
    Knob("seed_blend", "number", "recipe", "Seed A ↔ B",
         "position between the random seed's noise (0) and the second seed's (1)", default=0.5, keys=(",", "."),
         requires="seed_b", setter="set_seed_blend"),
    Knob("control", "choice", "recipe", "Control from",
         "how each frame becomes the ControlNet's image: edges of the frame, a sketch (dark on light, inverted) "
         "or lines (light on dark, as they are); default sketch for a drawing, else edges",
         choices=CONTROL_MODES, requires="controlnet", setter="set_control_mode"),
    Knob("control_strength", "number", "recipe", "Control strength",
         "how strongly the ControlNet's image steers (0.8 as the SDXS sketch demo; past 2 a frame is only the "
         "control)", default=0.8, high=2.0, keys=("c", "v"), requires="controlnet", setter="set_control_strength"),
    Knob("similarity_threshold", "number", "gate", "Skip still frames",
         "skip inference when no cell of a 32x32 grey thumbnail changed by this many grey levels since the last "
         "processed frame: above a webcam's sensor noise (~1 level), below any visible motion; 0 = off",
         default=3.0, high=255.0, step=0.5),
    Knob("blend", "number", "display", "Camera blend",
         "camera blend: shown = (1-blend)*AI + blend*camera", default=0.0, keys=("-", "+")),
    # 0.95, not 1: at 1 the shown image would never change again.
    Knob("ema", "number", "display", "EMA",
         "smoothing of the AI image per display tick: shown = ema*shown + (1-ema)*newest", default=0.4,
         high=0.95, keys=("d", "e")),
)
KNOBS: dict[str, Knob] = {knob.name: knob for knob in TABLE}
#: The knobs each place acts on, in table order.
RECIPE_KNOBS = tuple(k.name for k in TABLE if k.acts == "recipe")
DISPLAY_KNOBS = tuple(k.name for k in TABLE if k.acts == "display")
PROMPT_KNOBS = ("prompt", "prompt_b", "prompt_blend")


def default(name: str) -> Any:
    return KNOBS[name].default


def check(name: str, value: Any) -> Any:
    """`value` checked by knob `name`'s rule (the recipe's own checks use this too)."""
    return KNOBS[name].check(value)

"""`MLX_SDXS_SMOKE=1`: every command and the API at a toy scale, so a whole walk through the README runs in
seconds on a CPU (tests/test_readme.py sets it; it is no user setting). This is the one place that reads it,
and these are all of its effects:

- every model (a name, repo id, folder or random model, in `SDXSPipeline.from_pretrained` and on the command
  line) becomes the tiny random model of its kind: `random-tiny-sketch` for a model with a ControlNet, else
  `random-tiny` — nothing is downloaded or converted; `--vae` and the family's LoRAs are left out with it;
- `txt2img`/`img2img` generate 64×64 (`--size`); `stylize` renders 128 px on its longer side (`--render-side`);
- `camera`/`studio` render 128×128 and show 128 px halves, read the synthetic scene unless `--source` names
  one, stop after 2 displayed frames (or sooner by their own limits), open no browser, and serve on a free port.
"""

from __future__ import annotations

import argparse
import os

from mlx_sdxs import hub, presets

ENV = "MLX_SDXS_SMOKE"
SIZE = (64, 64)
RENDER_SIZE = (128, 128)
MAX_FRAMES = 2


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def model(name: str | None) -> str | None:
    """`name`, or under the smoke scale the tiny random model of its kind."""
    if not enabled():
        return name
    preset = presets.RANDOM_MODELS.get(name or "") or hub.known_preset(name or hub.DEFAULT_MODEL)
    controlled = preset is not None and presets.CONTROLNET in presets.configs(preset)
    return "random-tiny-sketch" if controlled else "random-tiny"


def shrink(args: argparse.Namespace) -> None:
    """A parsed command line at the smoke scale (no-op unless it is on)."""
    if not enabled():
        return
    settings = {"model": model(getattr(args, "model", None)), "vae": None, "lora": [], "size": SIZE,
                "render_size": RENDER_SIZE, "render_side": RENDER_SIZE[0], "output_size": RENDER_SIZE[1], "source": getattr(args, "source", None)
                or "synthetic", "max_frames": min(getattr(args, "max_frames", None) or MAX_FRAMES, MAX_FRAMES),
                "open": False, "port": 0}
    for name, value in settings.items():
        if hasattr(args, name):
            setattr(args, name, value)

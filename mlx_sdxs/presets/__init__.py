"""The configs the package ships: the target checkpoints' shapes (for random-weight models offline)
and a tiny model of the same layout for fast runs. Configs are facts copied from the checkpoints.

A preset is a folder of component configs; one that adds a component to another model (a ControlNet) holds
`preset.json` naming its `base` and only what it adds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlx_sdxs.errors import ConfigError

FOLDER = Path(__file__).parent
COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")
#: Components a model may add to the four above, each in its own folder of a checkpoint or converted folder.
CONTROLNET = "controlnet"
OPTIONAL_COMPONENTS = (CONTROLNET,)
#: The default model's preset (`hub.DEFAULT_MODEL`'s family name): its random stand-in's shape, and the bench's.
DEFAULT = "sdxs-512-0.9"
RANDOM_LABEL = "RANDOM WEIGHTS - not a trained model"


def names() -> list[str]:
    return sorted(p.name for p in FOLDER.iterdir() if (p / "unet" / "config.json").is_file()
                  or (p / "preset.json").is_file())


def random_model(preset: str) -> str:
    """The model name of random weights in `preset`'s shape: "random" for the default model's, else "random-<preset>"."""
    return "random" if preset == DEFAULT else f"random-{preset}"


#: Model names that build random weights offline (one per preset: each known model's stand-in, and the tiny
#: test models), and the preset whose shape they take.
RANDOM_MODELS = {random_model(preset): preset for preset in [DEFAULT, *(p for p in names() if p != DEFAULT)]}


def _config_file(folder: Path, component: str) -> Path:
    return folder / component / ("scheduler_config.json" if component == "scheduler" else "config.json")


def base(preset: str) -> str | None:
    """The preset that `preset` adds a component to (a ControlNet preset's model), or None for a whole model."""
    file = FOLDER / preset / "preset.json"
    return json.loads(file.read_text())["base"] if file.is_file() else None


def configs(preset: str) -> dict[str, dict[str, Any]]:
    """The component config dicts of a shipped preset (e.g. "sdxs-512-0.9"): unet, vae, text_encoder and
    scheduler, and a controlnet where the preset has one."""
    folder = FOLDER / preset
    if base(preset) is not None:
        found = configs(base(preset))
    elif (folder / "unet" / "config.json").is_file():
        found = {c: json.loads(_config_file(folder, c).read_text()) for c in COMPONENTS}
    else:
        raise ConfigError(f"no preset {preset!r} (have: {', '.join(names())})")
    for component in OPTIONAL_COMPONENTS:
        if _config_file(folder, component).is_file():
            found[component] = json.loads(_config_file(folder, component).read_text())
    return found


#: model_index.json key that marks a checkpoint (and what is converted or exported from it) as random.
RANDOM_MARKER = "_mlx_sdxs_random_weights"


def controlnet_folder(folder: str | Path) -> Path | None:
    """The ControlNet a diffusers checkpoint or converted folder carries (its `controlnet/`), or None."""
    found = Path(folder) / CONTROLNET
    return found if found.is_dir() else None


def is_random_checkpoint(folder: Path) -> bool:
    """Whether a diffusers checkpoint or converted folder holds random weights (see `reference`)."""
    try:
        return bool(json.loads((Path(folder) / "model_index.json").read_text()).get(RANDOM_MARKER))
    except (OSError, ValueError):
        return False


def weights_label(folder: str | Path) -> str | None:
    """What every output of a model loaded from `folder` must say: RANDOM_LABEL for random weights, else None."""
    return RANDOM_LABEL if is_random_checkpoint(Path(folder)) else None

"""The configs the package ships: the target checkpoints' shapes (for random-weight models offline)
and a tiny model of the same layout for fast runs. Configs are facts copied from the checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlx_sdxs.errors import ConfigError

FOLDER = Path(__file__).parent
COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")
#: `--model` names that build random weights offline, and the preset whose shape they take.
RANDOM_MODELS = {"random": "sdxs-512-0.9", "random-tiny": "tiny"}
RANDOM_LABEL = "RANDOM WEIGHTS - not a trained model"


def names() -> list[str]:
    return sorted(p.name for p in FOLDER.iterdir() if (p / "unet" / "config.json").is_file())


def configs(preset: str) -> dict[str, dict[str, Any]]:
    """unet / vae / text_encoder / scheduler config dicts of a shipped preset (e.g. "sdxs-512-0.9")."""
    folder = FOLDER / preset
    if not (folder / "unet" / "config.json").is_file():
        raise ConfigError(f"no preset {preset!r} (have: {', '.join(names())})")
    files = {c: folder / c / ("scheduler_config.json" if c == "scheduler" else "config.json") for c in COMPONENTS}
    return {c: json.loads(path.read_text()) for c, path in files.items()}


#: model_index.json key that marks a checkpoint (and what is converted or exported from it) as random.
RANDOM_MARKER = "_mlx_sdxs_random_weights"


def is_random_checkpoint(folder: Path) -> bool:
    """Whether a diffusers checkpoint or converted folder holds random weights (see `reference`)."""
    try:
        return bool(json.loads((Path(folder) / "model_index.json").read_text()).get(RANDOM_MARKER))
    except (OSError, ValueError):
        return False

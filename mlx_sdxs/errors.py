"""Errors users can act on. Every message names the file, key, flag or value at fault.

`read_json` is the one reader of the JSON files users hand over (configs, tokenizer vocabularies): a
missing or broken file becomes one of these errors, saying which file and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class SDXSError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero, without a traceback."""


class ConfigError(SDXSError):
    """A config.json field is unknown, unsupported or invalid."""


class WeightsError(SDXSError):
    """Weights are missing, corrupt, of the wrong shape/dtype, or from an incompatible converter."""


class ImageError(SDXSError):
    """An input image cannot be decoded or has an unusable size."""


class SourceError(SDXSError):
    """A camera or video source cannot be opened or stopped delivering frames."""


class BackendUnavailable(SDXSError):
    """An inference backend cannot run on this machine (e.g. CoreML prediction off macOS)."""


class ModelUnavailable(SDXSError):
    """A Hub model is neither reachable nor in the Hugging Face cache (offline, nothing cached)."""


class RandomWeightsWarning(UserWarning):
    """A known model could not be had, so random weights in its shape stand in for it (see `hub.random_stand_in`)."""


def read_json(path: Path, missing: str, error: type[SDXSError] = ConfigError) -> Any:
    """The parsed file; `missing` says what should be there (WeightsError), `error` is raised for bad JSON."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: missing ({missing})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None

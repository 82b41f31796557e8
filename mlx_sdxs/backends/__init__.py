"""Inference backends for the camera loop, the studio and the bench: the shared recipe on MLX, PyTorch,
ONNX Runtime or CoreML, opened by name from one `BackendChoice`.

The comparison backends need a diffusers checkpoint (and, for ONNX/CoreML, an export of it at the
render size, made once under the weights folder). Without a model every backend uses the default model;
offline, every backend follows the one rule of `hub.random_stand_in`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from mlx_sdxs import hub, presets, runtime
from mlx_sdxs.errors import BackendUnavailable, ConfigError, ModelUnavailable, SDXSError, WeightsError
from mlx_sdxs.recipe import Recipe, RecipeSettings

NAMES = ("mlx", "torch", "onnx", "coreml")
#: CoreML's compute units (`--compute-units`), the first the default.
COMPUTE_UNITS = ("CPU_AND_GPU", "ALL", "CPU_AND_NE", "CPU_ONLY")


@dataclass(frozen=True)
class BackendChoice:
    """Which backend and model a session runs (the CLI's model/backend flags)."""

    backend: str = "mlx"
    model: str | None = None
    vae: str | None = None
    dtype: str = "auto"
    kernels: str | None = None
    weights_dir: Path | None = None
    offline: bool = False
    export_dir: Path | None = None
    compute_units: str = COMPUTE_UNITS[0]
    device: str | None = None
    #: `--lora FILE_OR_REPO[:SCALE]` values (MLX only: merged when the model loads).
    lora: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args) -> "BackendChoice":
        values = {name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)}
        values["lora"] = tuple(values.get("lora") or ())
        return cls(**values)


def load_pipeline(choice: BackendChoice, log: TextIO | None = None):
    """The MLX pipeline the choice names (a known model that cannot be had offline: random weights in its shape,
    with a `RandomWeightsWarning`), its label said on `log`."""
    from mlx_sdxs.lora import LoraSpec
    from mlx_sdxs.pipeline import SDXSPipeline

    log = log if log is not None else sys.stderr
    loras = [LoraSpec.parse(text) for text in choice.lora]
    pipeline = SDXSPipeline.from_pretrained(choice.model or hub.DEFAULT_MODEL, dtype=runtime.parse_dtype(choice.dtype),
                                            vae=choice.vae, weights_root=choice.weights_dir,
                                            offline=choice.offline or None, kernels=choice.kernels, loras=loras)
    if pipeline.label:
        print(f"mlx-sdxs: model {pipeline.name}: {pipeline.label}", file=log)
    return pipeline


def random_checkpoint(preset: str = presets.DEFAULT, weights_root: Path | None = None) -> Path:
    """A diffusers checkpoint with seeded random weights in a preset's shape, built once under the weights
    folder (needs torch and diffusers, as the comparison backends do)."""
    from mlx_sdxs.convert import atomic_dir
    from mlx_sdxs.backends.reference import write_random_checkpoint

    folder = (weights_root or hub.default_weights_root()) / f"random-{preset}-diffusers"
    if not presets.is_random_checkpoint(folder):
        with atomic_dir(folder) as staging:
            write_random_checkpoint(staging, preset)
    return folder


def diffusers_checkpoint(choice: BackendChoice) -> Path:
    """The diffusers checkpoint folder torch/ONNX/CoreML run: the model, else the default model (a known model that
    cannot be had offline: random weights in its shape, see `hub.random_stand_in`)."""
    model = choice.model or hub.DEFAULT_MODEL
    if model not in presets.RANDOM_MODELS:
        family = hub.family_model(model)
        try:
            folder = hub.checkpoint_folder(family.base if family else model, choice.offline or None)
        except ModelUnavailable as exc:
            model = hub.random_stand_in(model, exc)
    if model in presets.RANDOM_MODELS:
        return random_checkpoint(presets.RANDOM_MODELS[model], choice.weights_dir)
    if not hub.is_diffusers_checkpoint(folder):
        raise WeightsError(f"{folder}: the {choice.backend} backend runs a diffusers checkpoint (model_index.json, "
                           "unet/, vae/, …), not a converted MLX folder")
    return folder


def export_folder(choice: BackendChoice, checkpoint: Path, settings: RecipeSettings, controlnet: Path | None = None,
                  log: TextIO | None = None) -> Path:
    """`--export-dir`, else an export of `checkpoint` (with `controlnet` inside its UNet graph) at the render size,
    made once under the weights folder."""
    if choice.export_dir is not None:
        return choice.export_dir
    from mlx_sdxs.backends.exported import MANIFEST_FILE

    root = choice.weights_dir or hub.default_weights_root()
    name = hub.model_slug(checkpoint)
    if controlnet is not None and controlnet != presets.controlnet_folder(checkpoint):
        name += f"+{hub.model_slug(controlnet)}"
    folder = root / f"{name}-{choice.backend}-{settings.describe_size()}"
    if not (folder / MANIFEST_FILE).is_file():
        print(f"mlx-sdxs: exporting {checkpoint.name} to {choice.backend} at {settings.describe_size()} "
              f"(once, into {folder})…", file=log if log is not None else sys.stderr, flush=True)
        if choice.backend == "onnx":
            from mlx_sdxs.backends.export.onnx import export_onnx

            export_onnx(checkpoint, folder, settings.render_size, controlnet)
        else:
            from mlx_sdxs.backends.export.coreml import export_coreml

            export_coreml(checkpoint, folder, settings.render_size, controlnet_dir=controlnet)
    return folder


def open_backend(choice: BackendChoice, settings: RecipeSettings, prompt: str | None = None,
                 log: TextIO | None = None) -> Recipe:
    """The recipe on the chosen backend. Errors a user can act on (not installed, not on this OS, no such
    model) are `SDXSError`s with the backend's own message."""
    if choice.backend not in NAMES:
        raise SDXSError(f"backend must be one of {', '.join(NAMES)}, not {choice.backend!r}")
    if choice.backend == "mlx":
        return load_pipeline(choice, log=log).stream(settings, prompt)
    family = hub.family_model(choice.model)
    if choice.lora or (family is not None and family.lora is not None):
        raise BackendUnavailable(f"the {choice.backend} backend does not merge LoRAs: run this model on the mlx backend")
    if choice.backend == "coreml":
        from mlx_sdxs.backends.coreml import check_available

        check_available()  # before building or exporting anything
    if choice.backend in ("onnx", "coreml") and choice.export_dir is None:
        from mlx_sdxs.backends.exported import check_export_size

        check_export_size(settings.render_size)  # before torch loads for an export that would refuse it
    _require_torch(choice.backend)
    checkpoint = diffusers_checkpoint(choice)
    controlnet = presets.controlnet_folder(checkpoint)
    if family is not None and family.controlnet is not None and not presets.is_random_checkpoint(checkpoint):
        controlnet = hub.download(family.controlnet, choice.offline or None)
    if choice.backend == "torch":
        from mlx_sdxs.backends.torch_backend import TorchEngine, torch_dtype

        device = choice.device or "cpu"
        engine = TorchEngine(checkpoint, device, torch_dtype(choice.dtype, device), controlnet_dir=controlnet)
        recipe = Recipe(engine, settings, prompt)
    elif choice.backend == "onnx":
        from mlx_sdxs.backends.onnx_backend import onnx_stream

        recipe = onnx_stream(export_folder(choice, checkpoint, settings, controlnet, log), settings, prompt,
                             checkpoint_dir=checkpoint, provider=choice.device or "cpu")
    else:
        from mlx_sdxs.backends.coreml import coreml_stream

        recipe = coreml_stream(export_folder(choice, checkpoint, settings, controlnet, log), settings, prompt,
                               compute_units=choice.compute_units, checkpoint_dir=checkpoint)
    if (controlnet is not None) != recipe.controlled:  # an --export-dir made for another model
        recipe.close()
        has = "has no ControlNet, the model has one" if controlnet is not None else "has a ControlNet, the model none"
        raise ConfigError(f"export folder {choice.export_dir}: the export {has}; export this model with "
                          f"`mlx-sdxs export {choice.backend}`")
    return recipe


def compute_threads(backend: Recipe) -> int:
    """The CPU threads a backend's engine computes with (its own count where it keeps one, else every core): the
    bench reports them beside its timings so that a comparison is fair."""
    threads = getattr(backend.engine, "threads", None)
    return threads if threads is not None else os.cpu_count() or 1


def _require_torch(backend: str) -> None:
    from mlx_sdxs.errors import BackendUnavailable

    missing = [name for name in ("torch", "diffusers", "transformers") if _absent(name)]
    if missing:
        extra = {"torch": "reference", "onnx": "onnx", "coreml": "coreml"}[backend]
        raise BackendUnavailable(f"the {backend} backend needs {', '.join(missing)}: pip install 'mlx-sdxs[{extra}]'")


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None

"""Inference backends for the camera loop, the studio and the bench: the shared recipe on MLX, PyTorch,
ONNX Runtime or CoreML, opened by name from one `BackendChoice`.

The comparison backends need a diffusers checkpoint (and, for ONNX/CoreML, an export of it at the
render size, made once under the weights folder). Without `--model` every backend uses the default
model; where that is not available offline, it falls back to random weights in the SDXS-512-0.9 shape,
labelled as such on every output.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from mlx_sdxs import hub, presets, runtime
from mlx_sdxs.errors import BackendUnavailable, ConfigError, SDXSError, WeightsError
from mlx_sdxs.recipe import Recipe, RecipeSettings

NAMES = ("mlx", "torch", "onnx", "coreml")
RANDOM_FALLBACK_SHAPE = ">>> falling back to RANDOM WEIGHTS in the {} shape: NOT a trained model <<<"
#: CoreML's compute units (`--compute-units`), the first the default.
COMPUTE_UNITS = ("CPU_AND_GPU", "ALL", "CPU_AND_NE", "CPU_ONLY")
RANDOM_FALLBACK = RANDOM_FALLBACK_SHAPE.format("SDXS-512-0.9")


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


def random_preset(model: str | None) -> str | None:
    """The preset whose shape stands in for `model` when it cannot be had offline: the default model's, or a
    family model's (its base's when the family model only adds a LoRA); None for any other model."""
    if model is None:
        return "sdxs-512-0.9"
    name = hub.family_name(model)
    if name is None:
        return None
    return name if name in presets.names() else hub.family_name(hub.FAMILY[name].base)  # (a LoRA has no stand-in)


def load_pipeline(choice: BackendChoice, fallback_to_random: bool = False, log: TextIO | None = None):
    """The MLX pipeline the choice names; with `fallback_to_random`, random weights in its shape when the
    default model or a family model cannot be had (offline, nothing cached), saying so."""
    from mlx_sdxs.lora import LoraSpec
    from mlx_sdxs.pipeline import SDXSPipeline

    log = log if log is not None else sys.stderr
    dtype = runtime.parse_dtype(choice.dtype)
    loras = [LoraSpec.parse(text) for text in choice.lora]
    try:
        pipeline = SDXSPipeline.from_pretrained(choice.model or hub.DEFAULT_MODEL, dtype=dtype, vae=choice.vae,
                                                weights_root=choice.weights_dir, offline=choice.offline or None,
                                                kernels=choice.kernels, loras=loras)
    except SDXSError as exc:
        preset = random_preset(choice.model)
        if not fallback_to_random or preset is None:
            raise
        family = hub.family_model(choice.model)
        without = " (and without its LoRA)" if family is not None and family.lora is not None else ""
        print(f"mlx-sdxs: {exc}\nmlx-sdxs: {RANDOM_FALLBACK_SHAPE.format(preset)}{without}", file=log)
        pipeline = SDXSPipeline.random(preset, dtype=dtype, kernels=choice.kernels)
    if pipeline.label:
        print(f"mlx-sdxs: model {pipeline.name}: {pipeline.label}", file=log)
    return pipeline


def random_checkpoint(preset: str = "sdxs-512-0.9", weights_root: Path | None = None) -> Path:
    """A diffusers checkpoint with seeded random weights in a preset's shape, built once under the weights
    folder (needs torch and diffusers, as the comparison backends do)."""
    from mlx_sdxs.convert import atomic_dir
    from mlx_sdxs.backends.reference import write_random_checkpoint

    folder = (weights_root or hub.default_weights_root()) / f"random-{preset}-diffusers"
    if not presets.is_random_checkpoint(folder):
        with atomic_dir(folder) as staging:
            write_random_checkpoint(staging, preset)
    return folder


def diffusers_checkpoint(choice: BackendChoice, log: TextIO | None = None) -> Path:
    """The diffusers checkpoint folder torch/ONNX/CoreML run: `--model`, else the default model, else
    (offline, nothing cached) random weights in the SDXS shape."""
    log = log if log is not None else sys.stderr
    if choice.model in presets.RANDOM_MODELS:
        return random_checkpoint(presets.RANDOM_MODELS[choice.model], choice.weights_dir)
    family = hub.family_model(choice.model)
    try:
        folder = hub.checkpoint_folder(family.base if family else choice.model or hub.DEFAULT_MODEL,
                                       choice.offline or None)
    except SDXSError as exc:
        preset = random_preset(choice.model)
        if preset is None:
            raise
        print(f"mlx-sdxs: {exc}\nmlx-sdxs: {RANDOM_FALLBACK_SHAPE.format(preset)}", file=log)
        return random_checkpoint(preset, choice.weights_dir)
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
        raise SDXSError(f"--backend must be one of {', '.join(NAMES)}, not {choice.backend!r}")
    if choice.backend == "mlx":
        return load_pipeline(choice, fallback_to_random=True, log=log).stream(settings, prompt)
    family = hub.family_model(choice.model)
    if choice.lora or (family is not None and family.lora is not None):
        raise BackendUnavailable(f"the {choice.backend} backend does not merge LoRAs: run this model with --backend mlx")
    if choice.backend == "coreml":
        from mlx_sdxs.backends.coreml import check_available

        check_available()  # before building or exporting anything
    if choice.backend in ("onnx", "coreml") and choice.export_dir is None:
        from mlx_sdxs.backends.exported import check_export_size

        check_export_size(settings.render_size)  # before torch loads for an export that would refuse it
    _require_torch(choice.backend)
    checkpoint = diffusers_checkpoint(choice, log)
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
        raise ConfigError(f"--export-dir {choice.export_dir}: the export {has}; export this model with "
                          f"`mlx-sdxs export {choice.backend}`")
    if presets.is_random_checkpoint(checkpoint):
        recipe.label = presets.RANDOM_LABEL
    return recipe


def _require_torch(backend: str) -> None:
    from mlx_sdxs.errors import BackendUnavailable

    missing = [name for name in ("torch", "diffusers", "transformers") if _absent(name)]
    if missing:
        extra = {"torch": "reference", "onnx": "onnx", "coreml": "coreml"}[backend]
        raise BackendUnavailable(f"the {backend} backend needs {', '.join(missing)}: pip install 'mlx-sdxs[{extra}]'")


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None

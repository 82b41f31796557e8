"""Checkpoint keys → MLX keys, and strict loading of converted components.

This is the only module that knows diffusers/transformers parameter names. The MLX modules mirror
those names (lists become `name.0.…`), so a key map is mostly the identity; what differs is layout:
PyTorch convolutions are OIHW, MLX's are OHWI (NHWC activations), transposed once, at conversion.

A converted component folder holds `config.json` (the checkpoint's own, untouched) and
`model.safetensors` in MLX layout, stamped with `FORMAT_VERSION` in the safetensors metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_sdxs import runtime
from mlx_sdxs.errors import ConfigError, SDXSError, WeightsError, read_json

FORMAT_NAME = "mlx-sdxs"
#: Bumped whenever the MLX layout of converted weights changes; older folders must be reconverted.
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Diffusers' legacy attention names (VAE mid-block, pre-0.14 checkpoints) → current ones.
_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
#: transformers 4 puts CLIP's layers under `text_model.` (transformers 5 does not); the MLX model has no such level.
_TEXT_MODEL = "text_model."
#: kohya / A1111 LoRA module names: a component's prefix, then the layer's path with "_" for ".".
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}


def map_key(component: str, key: str) -> str | None:
    """Map one checkpoint key of `component` ("unet", "vae", "text_encoder", "controlnet") to its MLX key.

    Returns None for buffers that are not parameters (e.g. CLIP's `position_ids`).
    """
    if component == "text_encoder":
        if key.endswith("position_ids"):
            return None
        return key.removeprefix(_TEXT_MODEL)
    if component == "vae":
        for old, new in _LEGACY_ATTENTION.items():
            key = key.replace(old, new)
        return key
    if component in ("unet", "controlnet"):
        return key
    raise ValueError(f"unknown component {component!r}")


def peft_layer(module: str) -> tuple[str, str]:
    """A PEFT LoRA's module path → (component, the MLX layer's path). CLIP's layers are `text_model.encoder.…`
    (transformers 4) or `encoder.…` (5); the UNet has no `encoder`."""
    component = "text_encoder" if module.startswith((_TEXT_MODEL, "encoder.")) else "unet"
    return component, module.removeprefix(_TEXT_MODEL)


def kohya_layer(name: str) -> tuple[str, str] | None:
    """A kohya LoRA module name → (component, the layer in kohya's spelling, see `kohya_spellings`), or None
    when its prefix names no component."""
    for prefix, component in KOHYA_PREFIXES.items():
        if name.startswith(prefix):
            return component, name.removeprefix(prefix)
    return None


def kohya_spellings(component: str, path: str) -> tuple[str, ...]:
    """How a kohya LoRA may spell the MLX layer at `path`: dots as underscores, and for CLIP also behind
    `text_model_` (transformers 4's level, as kohya writes it)."""
    kohya = path.replace(".", "_")
    return (kohya, _TEXT_MODEL.replace(".", "_") + kohya) if component == "text_encoder" else (kohya,)


def adapt_layout(value: mx.array, expected_shape: tuple[int, ...]) -> mx.array:
    """PyTorch tensor layout → MLX layout: conv OIHW → OHWI; a 1×1 conv that MLX runs as Linear → 2-D."""
    if value.ndim == 4:
        value = value.transpose(0, 2, 3, 1)
        if len(expected_shape) == 2 and value.shape[1:3] == (1, 1):
            value = value.reshape(value.shape[0], value.shape[3])
    elif value.ndim == 2 and len(expected_shape) == 4 and expected_shape[1:3] == (1, 1):
        value = value.reshape(value.shape[0], 1, 1, value.shape[1])
    return value


def read_config(component_dir: Path) -> dict[str, Any]:
    return read_json(Path(component_dir) / CONFIG_FILE, f"expected a component folder with {CONFIG_FILE}")


def build_model_from(component_dir: Path, component: str) -> nn.Module:
    """`build_model` on a folder's config.json; a config error names that file."""
    config = read_config(component_dir)
    try:
        return build_model(config, component)
    except ConfigError as exc:
        raise ConfigError(f"{Path(component_dir) / CONFIG_FILE}: {exc}") from None


def build_model(config: dict[str, Any], component: str) -> nn.Module:
    """Instantiate the MLX module a checkpoint config describes. Parameters are lazy: nothing is computed."""
    from mlx_sdxs.models import autoencoder_kl, clip, controlnet, taesd, unet

    class_name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    registry = {
        ("unet", "UNet2DConditionModel"): (unet.UNetConfig, unet.UNet2DConditionModel),
        ("vae", "AutoencoderTiny"): (taesd.TinyVAEConfig, taesd.AutoencoderTiny),
        ("vae", "AutoencoderKL"): (autoencoder_kl.KLVAEConfig, autoencoder_kl.AutoencoderKL),
        ("text_encoder", "CLIPTextModel"): (clip.CLIPTextConfig, clip.CLIPTextModel),
        ("controlnet", "ControlNetModel"): (controlnet.ControlNetConfig, controlnet.ControlNetModel),
    }
    if (component, class_name) not in registry:
        known = ", ".join(name for comp, name in registry if comp == component)
        raise ConfigError(f"{component}: unsupported model class {class_name!r} (supported: {known})")
    config_cls, model_cls = registry[component, class_name]
    return model_cls(config_cls.from_dict(config))


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in tree_flatten(model.parameters())}


def expected_dtypes(model: nn.Module) -> dict[str, mx.Dtype]:
    return {key: value.dtype for key, value in tree_flatten(model.parameters())}


def check_keys(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str
) -> None:
    """Raise one WeightsError listing every missing, unexpected and mis-shaped key."""
    problems = []
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:20])}" + (" …" if len(missing) > 20 else ""))
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:20])}" + (" …" if len(unexpected) > 20 else "")
        )
    for key in sorted(found.keys() & expected.keys()):
        if found[key] != expected[key]:
            problems.append(f"key {key}: shape {found[key]} but the model expects {expected[key]}")
    if problems:
        raise WeightsError(f"{where}: " + "; ".join(problems[:30]))


def check_dtypes(found: dict[str, mx.Dtype], expected: dict[str, mx.Dtype], where: str) -> None:
    """Refuse integer/bool tensors where the model has floating-point parameters (any float width is cast)."""
    wrong = [f"key {key}: dtype {str(found[key]).removeprefix('mlx.core.')} but the model expects floating point"
             for key in sorted(found.keys() & expected.keys())
             if mx.issubdtype(expected[key], mx.floating) and not mx.issubdtype(found[key], mx.floating)]
    if wrong:
        raise WeightsError(f"{where}: " + "; ".join(wrong[:30]))


def check_tensors(tensors: dict[str, mx.array], model: nn.Module, where: str) -> None:
    """Every parameter of `model` present once, with its shape and a floating-point dtype; else one WeightsError."""
    check_keys({k: tuple(v.shape) for k, v in tensors.items()}, expected_shapes(model), where)
    check_dtypes({k: v.dtype for k, v in tensors.items()}, expected_dtypes(model), where)


def read_safetensors(path: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Read a safetensors file with MLX (no torch; bf16 included), turning any decode failure into WeightsError."""
    if not path.is_file():
        raise WeightsError(f"{path}: missing")
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
    except MemoryError:
        raise SDXSError(f"{path}: out of memory while loading {path.stat().st_size / 2**30:.2f} GiB of weights "
                        "(close other programs, or use a smaller dtype such as float16)") from None
    except Exception as exc:  # MLX raises RuntimeError/ValueError with terse text for corrupt files
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    return weights, metadata or {}


def compute_dtype(model: nn.Module, dtype: mx.Dtype) -> mx.Dtype:
    """The dtype `model` runs in under a runtime dtype: a VAE whose config sets `force_upcast` (SD's KL
    VAE overflows in float16) stays float32 when the runtime is float16, as in diffusers."""
    if dtype == mx.float16 and getattr(getattr(model, "config", None), "force_upcast", False):
        return mx.float32
    return dtype


def parameter_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype of the model's floating-point parameters."""
    return next(v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating))


def prepare(model: nn.Module, dtype: mx.Dtype | None = None, kernels: str | None = None) -> nn.Module:
    """Cast (see `compute_dtype`), evaluate and give `model` the kernel policy's ops; returns it.
    `dtype=None` keeps the stored dtype; `kernels=None` takes the process's policy (`runtime`)."""
    stored = parameter_dtype(model)
    dtype = compute_dtype(model, dtype or stored)
    if dtype != stored:
        model.set_dtype(dtype)
    model.eval()
    mx.eval(model.parameters())
    runtime.apply_kernels(model, dtype, kernels)
    return model


def load_component(component_dir: str | Path, component: str, dtype: mx.Dtype | None = None,
                   kernels: str | None = None) -> nn.Module:
    """Build the module from `config.json`, load `model.safetensors` strictly, then `prepare` it."""
    component_dir = Path(component_dir)
    if not component_dir.is_dir():
        raise WeightsError(f"{component_dir}: no such folder (expected a converted {component} folder)")
    model = build_model_from(component_dir, component)
    path = component_dir / WEIGHTS_FILE
    weights, metadata = read_safetensors(path)
    version = metadata.get("format_version")
    if metadata.get("format") != FORMAT_NAME or version is None:
        raise WeightsError(
            f"{path}: not converted by mlx-sdxs (run `mlx-sdxs convert` on the diffusers checkpoint)"
        )
    if version != str(FORMAT_VERSION):
        raise WeightsError(
            f"{path}: converted with weights format {version}, this mlx-sdxs reads format {FORMAT_VERSION}; "
            "reconvert with `mlx-sdxs convert`"
        )
    check_tensors(weights, model, str(path))
    model.load_weights(list(weights.items()), strict=True)
    return prepare(model, dtype, kernels)


def load_unet(path: str | Path, dtype: mx.Dtype | None = None, kernels: str | None = None) -> nn.Module:
    """Load a converted UNet folder (`weights/<name>/unet`)."""
    return load_component(path, "unet", dtype, kernels)


def load_vae(path: str | Path, dtype: mx.Dtype | None = None, kernels: str | None = None) -> nn.Module:
    """Load a converted VAE folder: AutoencoderTiny or AutoencoderKL, as its config says."""
    return load_component(path, "vae", dtype, kernels)


def load_text_encoder(path: str | Path, dtype: mx.Dtype | None = None, kernels: str | None = None) -> nn.Module:
    """Load a converted CLIP text encoder folder."""
    return load_component(path, "text_encoder", dtype, kernels)


def load_controlnet(path: str | Path, dtype: mx.Dtype | None = None, kernels: str | None = None) -> nn.Module:
    """Load a converted ControlNet folder."""
    return load_component(path, "controlnet", dtype, kernels)

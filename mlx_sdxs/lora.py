"""LoRA adapters, merged into the weights when a model loads: W ← W + scale·(alpha/r)·B·A.

Two layouts are read, both without PyTorch:
- PEFT adapters (`adapter_config.json` + `adapter_model.safetensors`, as IDKiro/sdxs-512-dreamshaper-anime
  ships): keys `base_model.model.<module>.lora_A.weight` / `lora_B.weight`; r, lora_alpha, rank_pattern /
  alpha_pattern and rsLoRA from the config;
- the kohya / A1111 `.safetensors` layout of style LoRAs for SD-1.5 checkpoints such as DreamShaper:
  `<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`.
Which model layer a `<module>` names is checkpoint-key knowledge, kept in `weights` (`peft_layer`,
`kohya_layer`, `kohya_spellings`); this module reads the formats' own factor names.

A LoRA is applied in memory, never written into a converted folder: a converted model is always the
base model. Keys that name no layer of the model, and factors whose shape does not fit the layer they
name (a LoRA made for another base), are errors naming them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sdxs.errors import ConfigError, WeightsError, read_json
from mlx_sdxs.weights import KOHYA_PREFIXES, adapt_layout, kohya_layer, kohya_spellings, peft_layer

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
#: PEFT config fields that change what the update means (not W + scale·B·A on one layer): refused, never mis-merged.
_PEFT_VARIANTS = ("use_dora", "fan_in_fan_out", "use_qalora", "alora_invocation_tokens", "use_bdlora",
                  "kasa_config", "velora_config", "arrow_config", "lora_bias")
_SHOWN = 5


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA spec, "FILE_OR_REPO[:SCALE]": a LoRA and the strength it is merged at (default 1)."""

    source: str
    scale: float = 1.0

    def __post_init__(self):
        if not math.isfinite(self.scale):
            raise ConfigError(f"LoRA spec {self.source}: scale {self.scale} is not a finite number")

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        source, _, scale = text.rpartition(":")
        if source and not re.fullmatch(r"[A-Za-z]", source):  # not a Windows drive letter
            try:
                value = float(scale)
            except ValueError:
                return cls(text)
            return cls(source, value)
        return cls(text)


@dataclass(frozen=True)
class Factors:
    """One layer's low-rank update: `up` (out, r[, 1, 1]) · `down` (r, in[, kh, kw]) · `factor` (alpha/r)."""

    down: np.ndarray
    up: np.ndarray
    factor: float

    def check(self, where: str, key: str) -> None:
        """Factors whose ranks disagree cannot be one update: an error naming the layer."""
        if self.up.ndim < 2 or self.down.ndim < 2 or self.up.shape[1] != self.down.shape[0]:
            raise WeightsError(f"{where}: {key!r}: up {self.up.shape} and down {self.down.shape} are not one "
                               "low-rank pair (their ranks differ)")

    def delta(self) -> np.ndarray:
        """B·A in the layer's PyTorch layout (out, in) or (out, in, kh, kw), float32."""
        down, up = self.down.astype(np.float32), self.up.astype(np.float32)
        rank = down.shape[0]
        product = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
        return self.factor * product.reshape(up.shape[0], *down.shape[1:])


def read(path: Path) -> dict[tuple[str, str], Factors]:
    """The LoRA at `path` (a PEFT adapter folder or a kohya .safetensors file): (component, module) → factors."""
    path = Path(path)
    if path.is_dir():
        if not (path / PEFT_CONFIG).is_file() or not (path / PEFT_WEIGHTS).is_file():
            raise WeightsError(f"{path}: a LoRA folder needs {PEFT_CONFIG} and {PEFT_WEIGHTS} (a PEFT adapter)")
        return _read_peft(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise WeightsError(f"{path}: not a LoRA (a PEFT adapter folder or a .safetensors file)")
    return _read_kohya(path)


def _tensors(file: Path) -> dict[str, np.ndarray]:
    try:
        return {k: np.asarray(v.astype(mx.float32)) for k, v in mx.load(str(file)).items()}
    except (RuntimeError, ValueError) as exc:
        raise WeightsError(f"{file}: unreadable safetensors ({exc})") from None


def _pattern_value(patterns: dict[str, int], module: str, default: float) -> float:
    """PEFT's per-module override: a pattern matches a module name's end, after a dot."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _peft_config(file: Path) -> dict:
    """The adapter's config, refused unless it describes plain LoRA updates (see _PEFT_VARIANTS)."""
    config = read_json(file, "a PEFT adapter's config")
    if not isinstance(config, dict):
        raise ConfigError(f"{file}: not a PEFT adapter config (a JSON object)")
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{file}: peft_type {config['peft_type']!r} is not LORA")
    variants = [name for name in _PEFT_VARIANTS if config.get(name)]
    if variants:
        raise ConfigError(f"{file}: {', '.join(variants)} adapters are not supported (plain LoRA only)")
    return config


def _positive(value, what: str, file: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{file}: {what} is {value!r}, not a positive number")
    return float(value)


def _read_peft(folder: Path) -> dict[tuple[str, str], Factors]:
    config_file, weights_file = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    config = _peft_config(config_file)
    tensors = _tensors(weights_file)
    factors = {}
    for key in sorted(tensors):
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_A(?:\.[\w-]+)?\.weight", key)
        if not match:
            if not re.fullmatch(r"base_model\.model\..+\.lora_B(?:\.[\w-]+)?\.weight", key):
                raise WeightsError(f"{weights_file}: key {key!r} is not a LoRA factor of this layout")
            if key.replace(".lora_B", ".lora_A") not in tensors:
                raise WeightsError(f"{weights_file}: {key!r} has no {key.replace('.lora_B', '.lora_A')!r}")
            continue
        module = match.group(1)
        up_key = key.replace(".lora_A", ".lora_B")
        if up_key not in tensors:
            raise WeightsError(f"{weights_file}: {key!r} has no {up_key!r}")
        rank = _positive(_pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8)), "r", config_file)
        alpha = _positive(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)),
                          "lora_alpha", config_file)
        if tensors[key].shape[0] != rank:
            raise WeightsError(f"{weights_file}: {key!r} has rank {tensors[key].shape[0]}, but the config says "
                               f"r = {rank:g} for {module}")
        factor = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        pair = Factors(tensors[key], tensors[up_key], factor)
        pair.check(str(weights_file), key)
        factors[peft_layer(module)] = pair
    return _nonempty(factors, weights_file)


def _nonempty(factors: dict, file: Path) -> dict:
    if not factors:
        raise WeightsError(f"{file}: holds no LoRA layer (no down/A factor)")
    return factors


def _read_kohya(file: Path) -> dict[tuple[str, str], Factors]:
    tensors = _tensors(file)
    factors = {}
    for key in sorted(tensors):
        if not key.endswith(".lora_down.weight"):
            suffix = re.search(r"\.(lora_up\.weight|alpha)$", key)
            if suffix is None:
                raise WeightsError(f"{file}: key {key!r} is not a LoRA factor (kohya layout: .lora_down.weight, "
                                   ".lora_up.weight, .alpha)")
            if key[: suffix.start()] + ".lora_down.weight" not in tensors:
                raise WeightsError(f"{file}: {key!r} has no {key[: suffix.start()]}.lora_down.weight")
            continue
        name = key.removesuffix(".lora_down.weight")
        layer = kohya_layer(name)
        if layer is None:
            raise WeightsError(f"{file}: {key!r} names neither the UNet nor the text encoder (its name starts with "
                               f"none of {', '.join(KOHYA_PREFIXES)})")
        if f"{name}.lora_up.weight" not in tensors:
            raise WeightsError(f"{file}: {key!r} has no {name}.lora_up.weight")
        down = tensors[key]
        rank = down.shape[0]
        alpha = tensors.get(f"{name}.alpha", np.float32(rank))
        if np.size(alpha) != 1:
            raise WeightsError(f"{file}: {name}.alpha has shape {np.shape(alpha)}, not one number")
        pair = Factors(down, tensors[f"{name}.lora_up.weight"], float(np.reshape(alpha, ())) / rank)
        pair.check(str(file), key)
        component, spelling = layer
        factors[component, "~" + spelling] = pair
    return _nonempty(factors, file)


def _layers(model: nn.Module, component: str) -> dict[str, nn.Module]:
    """The model's layers a LoRA can name: by module path, and (prefixed ~) by the kohya spelling of it."""
    layers = {}
    for name, module in model.named_modules():
        if "weight" in module and isinstance(module.weight, mx.array) and module.weight.ndim in (2, 4):
            layers[name] = module
            for spelling in kohya_spellings(component, name):
                layers["~" + spelling] = module
    return layers


def merge(models: dict[str, nn.Module], lora: dict[tuple[str, str], Factors], scale: float, where: str) -> int:
    """Add every update of `lora` (× `scale`) to the layer it names in `models` (component → model), in float32,
    kept in each weight's dtype; returns how many layers changed. Nothing changes when a key or shape is wrong."""
    layers = {component: _layers(model, component) for component, model in models.items()}
    unknown = [module for (component, module) in lora if module not in layers.get(component, {})]
    if unknown:
        shown = ", ".join(m.lstrip("~") for m in unknown[:_SHOWN]) + (f" (+{len(unknown) - _SHOWN} more)"
                                                                     if len(unknown) > _SHOWN else "")
        raise WeightsError(f"{where}: {len(unknown)} LoRA layer(s) name nothing in this model: {shown}")
    updates = []
    for (component, module), factors in lora.items():
        layer = layers[component][module]
        delta = adapt_layout(mx.array(factors.delta()), tuple(layer.weight.shape))
        if tuple(delta.shape) != tuple(layer.weight.shape):
            raise WeightsError(f"{where}: LoRA layer {module.lstrip('~')} updates a {tuple(delta.shape)} weight but "
                               f"this model's is {tuple(layer.weight.shape)}: the LoRA was made for another base model")
        updates.append((layer, delta))
    for layer, delta in updates:
        layer.weight = (layer.weight.astype(mx.float32) + scale * delta).astype(layer.weight.dtype)
        mx.eval(layer.weight)
    return len(updates)

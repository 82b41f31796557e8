"""Random-weight diffusers checkpoints in a real model's shape, for the bench and the parity tests.

Needs the `reference` extra (torch, diffusers, transformers); nothing in the MLX runtime imports it.
The checkpoint is a real diffusers folder, so every backend (MLX after conversion, PyTorch, ONNX,
CoreML) runs the very same weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlx_sdxs import presets
from mlx_sdxs.tokenizer import CLIPTokenizer, byte_level_tokenizer, save_tokenizer

COMPONENTS = ("unet", "vae", "text_encoder")


def build_torch_models(configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """diffusers/transformers modules (default random init) from config dicts."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    def from_config(cls, config):
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})

    unet = from_config(diffusers.UNet2DConditionModel, configs["unet"])
    vae = from_config(getattr(diffusers, configs["vae"].get("_class_name", "AutoencoderTiny")), configs["vae"])
    text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items() if k != "architectures"}))
    models = {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text.eval()}
    if "controlnet" in configs:
        models["controlnet"] = from_config(diffusers.ControlNetModel, configs["controlnet"]).eval()
    return models


def write_checkpoint(dst: str | Path, models: dict[str, Any], scheduler_config: dict[str, Any],
                     tokenizer: CLIPTokenizer | None = None, random: bool = False) -> Path:
    """Save modules + tokenizer + scheduler as a diffusers checkpoint folder (model_index.json included);
    `random` marks it as random weights, so every output made from it is labelled."""
    dst = Path(dst)
    for component in (*COMPONENTS, *(c for c in presets.OPTIONAL_COMPONENTS if c in models)):
        models[component].save_pretrained(dst / component, safe_serialization=True)
    save_tokenizer(tokenizer or byte_level_tokenizer(), dst / "tokenizer")
    (dst / "scheduler").mkdir(parents=True, exist_ok=True)
    (dst / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", type(models["vae"]).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler_config.get("_class_name", "EulerDiscreteScheduler")],
    }
    if random:
        index[presets.RANDOM_MARKER] = True
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))
    return dst


def write_random_checkpoint(dst: str | Path, preset: str = presets.DEFAULT, seed: int = 0) -> Path:
    """A diffusers checkpoint with seeded random weights in `preset`'s shape."""
    import torch

    torch.manual_seed(seed)
    configs = presets.configs(preset)
    return write_checkpoint(dst, build_torch_models(configs), configs["scheduler"], random=True)

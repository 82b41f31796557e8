"""Offline export commands: a diffusers checkpoint → CoreML packages (`convert.coreml`) or ONNX graphs (`convert.onnx`).

Both export the same three graphs, built here once from `mlx_sdxs.backends.torch_backend`'s
wrappers: UNet ε, VAE encoder (image in [-1, 1] → UNet-space latents, i.e. × scaling_factor) and
VAE decoder (UNet-space latents → image in [-1, 1]). The text encoder is not exported: the
backends encode each prompt once with the source checkpoint's CLIP (see the manifest).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mlx_sdxs.backends.numpy_recipe import (DECODER_INPUT, DECODER_OUTPUT, ENCODER_INPUT, ENCODER_OUTPUT,
                                            UNET_INPUTS, UNET_OUTPUT, ExportManifest)
from mlx_sdxs.backends.torch_backend import UNetEpsilon, VAEDecoder, VAEEncoder, load_unet, load_vae
from mlx_sdxs.convert import atomic_dir
from mlx_sdxs.errors import ConfigError

RENDER_SIZES = tuple(range(256, 1025, 64))
MAX_PROMPT_TOKENS = 77


def check_render_size(render_size: int, allowed: tuple[int, ...] = RENDER_SIZES) -> int:
    """Exports have static shapes, one render size each; refuse sizes the recipe does not support."""
    if render_size not in allowed:
        raise ConfigError(f"--render-size must be a multiple of 64 from {allowed[0]} to {allowed[-1]}, "
                          f"got {render_size}")
    return render_size


@dataclass
class Graph:
    """One network to export: the module, example inputs (name → tensor) and its output name."""

    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    output: str


def build_graphs(checkpoint_dir: str | Path, render_size: int) -> dict[str, Graph]:
    """The UNet, VAE encoder and VAE decoder of a diffusers checkpoint, in fp32 eval mode, with example inputs."""
    checkpoint_dir = Path(checkpoint_dir)
    unet, vae = load_unet(checkpoint_dir), load_vae(checkpoint_dir)
    text_dim = int(unet.config.cross_attention_dim)
    channels, side = int(vae.config.latent_channels), render_size // 8
    latents = torch.randn(1, channels, side, side)
    image = torch.rand(1, 3, render_size, render_size) * 2 - 1
    unet_inputs = (latents, torch.tensor([999.0]), torch.randn(1, MAX_PROMPT_TOKENS, text_dim))
    return {
        "unet": Graph(UNetEpsilon(unet).eval(), dict(zip(UNET_INPUTS, unet_inputs)), UNET_OUTPUT),
        "vae_encoder": Graph(VAEEncoder(vae).eval(), {ENCODER_INPUT: image}, ENCODER_OUTPUT),
        "vae_decoder": Graph(VAEDecoder(vae).eval(), {DECODER_INPUT: latents}, DECODER_OUTPUT),
    }


def make_manifest(format: str, checkpoint_dir: str | Path, render_size: int, precision: str,
                  graphs: dict[str, Graph], files: dict[str, str]) -> ExportManifest:
    def shapes(named: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        return {name: list(tensor.shape) for name, tensor in named.items()}

    latents = list(graphs["unet"].inputs["sample"].shape)
    outputs = {"unet": {UNET_OUTPUT: latents}, "vae_encoder": {ENCODER_OUTPUT: latents},
               "vae_decoder": {DECODER_OUTPUT: [1, 3, render_size, render_size]}}
    return ExportManifest(
        format=format,
        render_size=render_size,
        precision=precision,
        latent_channels=int(graphs["unet"].inputs["sample"].shape[1]),
        text_dim=int(graphs["unet"].inputs["encoder_hidden_states"].shape[2]),
        checkpoint=str(Path(checkpoint_dir).resolve()),
        files=files,
        inputs={c: shapes(g.inputs) for c, g in graphs.items()},
        outputs=outputs,
    )


def export_graphs(checkpoint_dir: str | Path, out_dir: str | Path, render_size: int, export_format: str,
                  precision: str, suffix: str, save: Callable[[Graph, Path], None]) -> Path:
    """Build the three graphs, `save` each as `<component><suffix>`, write the manifest; `out_dir` is
    replaced only once everything succeeded."""
    check_render_size(render_size)
    out_dir = Path(out_dir)
    graphs = build_graphs(checkpoint_dir, render_size)
    with atomic_dir(out_dir) as staging:
        files = {}
        for component, graph in graphs.items():
            files[component] = f"{component}{suffix}"
            save(graph, staging / files[component])
        make_manifest(export_format, checkpoint_dir, render_size, precision, graphs, files).save(staging)
    return out_dir


def export_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The arguments every export command takes: checkpoint, output folder, render size."""
    parser = argparse.ArgumentParser(prog=f"python -m convert.{module}", description=doc.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="diffusers checkpoint folder (model_index.json, unet/, vae/, …)")
    parser.add_argument("out", type=Path, help="output folder (replaced if it exists)")
    parser.add_argument("--render-size", type=int, default=512, help="square render size in pixels (default 512)")
    return parser

"""Export a diffusers checkpoint for the comparison runtimes: CoreML packages (`export.coreml`) or ONNX
graphs (`export.onnx`), both run by `mlx-sdxs export coreml|onnx`.

Both export the same three graphs, built here once from `mlx_sdxs.backends.torch_backend`'s
wrappers: UNet ε (with a ControlNet model, ControlNet + UNet as one graph), VAE encoder (image in [-1, 1] → UNet-space latents, i.e. × scaling_factor) and
VAE decoder (UNet-space latents → image in [-1, 1]). The text encoder is not exported: the
backends encode each prompt once with the source checkpoint's CLIP (see the manifest). Graphs
have static shapes: one export per render size (width × height).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mlx_sdxs.backends.exported import (CONTROL_INPUTS, DECODER_INPUT, DECODER_OUTPUT, ENCODER_INPUT,
                                        ENCODER_OUTPUT, UNET_INPUTS, UNET_OUTPUT, ExportManifest, check_export_size)
from mlx_sdxs import presets
from mlx_sdxs.backends.torch_backend import (ControlledUNetEpsilon, UNetEpsilon, VAEDecoder, VAEEncoder,
                                             load_controlnet, load_unet, load_vae)
from mlx_sdxs.convert import atomic_dir
from mlx_sdxs.frames import Size
from mlx_sdxs.recipe import DEFAULT_CONTROL_STRENGTH
from mlx_sdxs.tokenizer import MAX_LENGTH

@dataclass
class Graph:
    """One network to export: the module, example inputs (name → tensor) and its output name."""

    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    output: str


def build_graphs(checkpoint_dir: str | Path, render_size: Size, controlnet_dir: Path | None = None) -> dict[str, Graph]:
    """The UNet (with `controlnet_dir`'s ControlNet in front of it, if any), VAE encoder and VAE decoder of a
    diffusers checkpoint, in fp32 eval mode, with example inputs."""
    checkpoint_dir = Path(checkpoint_dir)
    unet, vae = load_unet(checkpoint_dir), load_vae(checkpoint_dir)
    text_dim = int(unet.config.cross_attention_dim)
    width, height = render_size
    latents = torch.randn(1, int(vae.config.latent_channels), height // 8, width // 8)
    image = torch.rand(1, 3, height, width) * 2 - 1
    unet_inputs = (latents, torch.tensor([999.0]), torch.randn(1, MAX_LENGTH, text_dim))
    if controlnet_dir is None:
        noise_graph = Graph(UNetEpsilon(unet).eval(), dict(zip(UNET_INPUTS, unet_inputs)), UNET_OUTPUT)
    else:
        control_inputs = (torch.rand(1, 3, height, width), torch.tensor([DEFAULT_CONTROL_STRENGTH]))
        noise_graph = Graph(ControlledUNetEpsilon(unet, load_controlnet(controlnet_dir)).eval(),
                            dict(zip(UNET_INPUTS + CONTROL_INPUTS, unet_inputs + control_inputs)), UNET_OUTPUT)
    return {
        "unet": noise_graph,
        "vae_encoder": Graph(VAEEncoder(vae).eval(), {ENCODER_INPUT: image}, ENCODER_OUTPUT),
        "vae_decoder": Graph(VAEDecoder(vae).eval(), {DECODER_INPUT: latents}, DECODER_OUTPUT),
    }


def make_manifest(format: str, checkpoint_dir: str | Path, render_size: Size, precision: str,
                  graphs: dict[str, Graph], files: dict[str, str], controlnet_dir: Path | None) -> ExportManifest:
    def shapes(named: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        return {name: list(tensor.shape) for name, tensor in named.items()}

    latents = list(graphs["unet"].inputs["sample"].shape)
    outputs = {"unet": {UNET_OUTPUT: latents}, "vae_encoder": {ENCODER_OUTPUT: latents},
               "vae_decoder": {DECODER_OUTPUT: [1, 3, render_size[1], render_size[0]]}}
    return ExportManifest(
        format=format,
        render_size=list(render_size),
        precision=precision,
        latent_channels=int(graphs["unet"].inputs["sample"].shape[1]),
        text_dim=int(graphs["unet"].inputs["encoder_hidden_states"].shape[2]),
        checkpoint=str(Path(checkpoint_dir).resolve()),
        files=files,
        inputs={c: shapes(g.inputs) for c, g in graphs.items()},
        outputs=outputs,
        controlnet=str(controlnet_dir.resolve()) if controlnet_dir is not None else None,
    )


def export_graphs(checkpoint_dir: str | Path, out_dir: str | Path, render_size: int | Size, export_format: str,
                  precision: str, suffix: str, save: Callable[[Graph, Path], None],
                  controlnet_dir: str | Path | None = None) -> Path:
    """Build the three graphs, `save` each as `<component><suffix>`, write the manifest; `out_dir` is
    replaced only once everything succeeded. `controlnet_dir`: a ControlNet folder (default: the checkpoint's
    `controlnet/`, if it has one)."""
    render_size = check_export_size(render_size)
    out_dir = Path(out_dir)
    controlnet_dir = Path(controlnet_dir) if controlnet_dir is not None else presets.controlnet_folder(checkpoint_dir)
    graphs = build_graphs(checkpoint_dir, render_size, controlnet_dir)
    with atomic_dir(out_dir) as staging:
        files = {}
        for component, graph in graphs.items():
            files[component] = f"{component}{suffix}"
            save(graph, staging / files[component])
        make_manifest(export_format, checkpoint_dir, render_size, precision, graphs, files, controlnet_dir).save(staging)
    return out_dir

"""Export a diffusers checkpoint's UNet and VAE encoder/decoder to ONNX for the ONNX Runtime CPU comparator.

    mlx-sdxs export onnx CHECKPOINT OUT [--render-size 512x512]

Writes OUT/unet.onnx (with a ControlNet model's ControlNet inside), OUT/vae_encoder.onnx, OUT/vae_decoder.onnx (fp32, static shapes for one
render size) and OUT/manifest.json. Uses the dynamo exporter at opset 18: with torch 2.13 the
legacy TorchScript exporter fails on the SDXS UNet, and dynamo at opset 17 produced an invalid graph.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from mlx_sdxs.backends.export import Graph, export_graphs

OPSET = 18


def export_onnx(checkpoint_dir: str | Path, out_dir: str | Path, render_size: int | tuple[int, int] = 512,
                controlnet_dir: str | Path | None = None) -> Path:
    """Export the three graphs (a ControlNet inside the UNet's, see `export_graphs`); `out_dir` is replaced only
    once all three succeeded."""
    def save(graph: Graph, path: Path) -> None:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph.module, tuple(graph.inputs.values()), path, dynamo=True, opset_version=OPSET,
                              input_names=list(graph.inputs), output_names=[graph.output], external_data=False,
                              verbose=False)

    return export_graphs(checkpoint_dir, out_dir, render_size, "onnx", "float32", ".onnx", save, controlnet_dir)

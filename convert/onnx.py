"""Export a diffusers checkpoint's UNet and VAE encoder/decoder to ONNX for the ONNX Runtime CPU comparator.

    python -m convert.onnx CHECKPOINT OUT [--render-size 512]

Writes OUT/unet.onnx, OUT/vae_encoder.onnx, OUT/vae_decoder.onnx (fp32, static shapes for one
render size) and OUT/manifest.json. Uses the dynamo exporter at opset 18: with torch 2.13 the
legacy TorchScript exporter fails on the SDXS UNet, and dynamo at opset 17 produced an invalid graph.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

from convert import build_graphs, check_render_size, make_manifest
from mlx_sdxs.convert import atomic_dir
from mlx_sdxs.errors import SDXSError

OPSET = 18


def export_onnx(checkpoint_dir: str | Path, out_dir: str | Path, render_size: int = 512) -> Path:
    """Export the three graphs; `out_dir` is replaced only once all three succeeded."""
    check_render_size(render_size)
    out_dir = Path(out_dir)
    graphs = build_graphs(checkpoint_dir, render_size)
    with atomic_dir(out_dir) as staging:
        files = {}
        for component, graph in graphs.items():
            files[component] = f"{component}.onnx"
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                torch.onnx.export(graph.module, tuple(graph.inputs.values()), staging / files[component],
                                  dynamo=True, opset_version=OPSET, input_names=list(graph.inputs),
                                  output_names=[graph.output], external_data=False, verbose=False)
        make_manifest("onnx", checkpoint_dir, render_size, "float32", graphs, files).save(staging)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m convert.onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="diffusers checkpoint folder (model_index.json, unet/, vae/, …)")
    parser.add_argument("out", type=Path, help="output folder (replaced if it exists)")
    parser.add_argument("--render-size", type=int, default=512, help="square render size in pixels (default 512)")
    args = parser.parse_args(argv)
    try:
        print(export_onnx(args.checkpoint, args.out, args.render_size))
    except SDXSError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()

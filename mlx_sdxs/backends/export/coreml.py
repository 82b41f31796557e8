"""Export a diffusers checkpoint's UNet and VAE encoder/decoder to CoreML ML Programs (the SDXS camera demo's backend).

    mlx-sdxs export coreml CHECKPOINT OUT [--render-size 512x512] [--precision float16|float32]

Writes OUT/unet.mlpackage (inputs sample (1,4,h/8,w/8), timestep (1,), encoder_hidden_states
(1,77,D), and for a ControlNet model controlnet_cond (1,3,h,w) in [0, 1] and conditioning_scale (1,); output
noise_pred), OUT/vae_encoder.mlpackage (image (1,3,h,w) in [-1, 1] → latents,
VAE scaling_factor already applied, i.e. UNet-space), OUT/vae_decoder.mlpackage (UNet-space
latents → image in [-1, 1]) and OUT/manifest.json. Inputs are float32; weights, arithmetic and
outputs are at `--precision`.

Route: `torch.export.export(...).run_decompositions({})` then `ct.convert`. The demo's
`torch.jit.trace` route fails for the SDXS UNet with torch 2.13, and one route for all three
graphs keeps them alike. Conversion works on any OS; prediction needs macOS.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from mlx_sdxs.backends.exported import COREML_PRECISIONS as PRECISIONS
from mlx_sdxs.backends.export import Graph, export_graphs

DEPLOYMENT_TARGETS = ("macOS13", "macOS14", "macOS15")


def convert_graph(graph: Graph, precision: str, minimum_deployment_target: str):
    """One graph → an in-memory `ct.models.MLModel` with the graph's input and output names."""
    import coremltools as ct

    with torch.inference_mode():
        exported = torch.export.export(graph.module, tuple(graph.inputs.values())).run_decompositions({})
    # ExportedProgram inputs are named after forward()'s arguments; `inputs=` is not accepted for them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ct.convert(
            exported,
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32,
            minimum_deployment_target=getattr(ct.target, minimum_deployment_target),
        )
    spec = model.get_spec()
    names = [feature.name for feature in spec.description.input]
    if names != list(graph.inputs):
        raise RuntimeError(f"CoreML inputs came out as {names}, expected {list(graph.inputs)}")
    ct.utils.rename_feature(spec, spec.description.output[0].name, graph.output)
    return ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True)


def export_coreml(checkpoint_dir: str | Path, out_dir: str | Path, render_size: int | tuple[int, int] = 512,
                  precision: str = "float16", minimum_deployment_target: str = "macOS14",
                  controlnet_dir: str | Path | None = None) -> Path:
    """Export the three graphs as `.mlpackage`s (a ControlNet inside the UNet's, see `export_graphs`); `out_dir`
    is replaced only once all three succeeded."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if minimum_deployment_target not in DEPLOYMENT_TARGETS:
        raise ValueError(f"minimum_deployment_target must be one of {', '.join(DEPLOYMENT_TARGETS)}")
    return export_graphs(checkpoint_dir, out_dir, render_size, "coreml", precision, ".mlpackage",
                         lambda graph, path: convert_graph(graph, precision, minimum_deployment_target).save(str(path)),
                         controlnet_dir)

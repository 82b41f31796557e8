"""What a frame computes, counted rather than timed: the UNet stage's FLOPs (torch's FlopCounterMode on the
diffusers UNet) and the MLX primitives one compiled frame evaluates (a GPU launch-count proxy that needs no GPU)."""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from bench.inputs import PROMPT

#: Graph nodes that only re-describe memory (no kernel of their own on a GPU) — left out of the count.
VIEW_PRIMITIVES = {"Reshape", "Transpose", "Slice", "Broadcast", "BroadcastAxes", "AsStrided", "ExpandDims",
                   "Squeeze", "Flatten", "Unflatten", "View", "StopGradient"}


def unet_flops(source: Path, size: int) -> float | None:
    """FLOPs of one UNet call at `size` (torch FlopCounterMode on the diffusers UNet, with the checkpoint's
    ControlNet in front of it if it has one: the recipe's UNet stage runs both), or None without torch."""
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from mlx_sdxs import presets
        from mlx_sdxs.backends.torch_backend import ControlledUNetEpsilon, UNetEpsilon, load_controlnet, load_unet
    except ImportError:
        return None
    unet = load_unet(source)
    inputs = (torch.zeros(1, unet.config.in_channels, size // 8, size // 8), torch.tensor([999]),
              torch.zeros(1, 77, unet.config.cross_attention_dim))
    controlnet = presets.controlnet_folder(source)
    if controlnet is None:
        network = UNetEpsilon(unet)
    else:
        network, inputs = (ControlledUNetEpsilon(unet, load_controlnet(controlnet)),
                           inputs + (torch.zeros(1, 3, size, size), 1.0))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        network(*inputs)
    return float(counter.get_total_flops())


def count_graph(outputs) -> Counter:
    """Non-view primitives in the unevaluated MLX graph behind `outputs`, by primitive name."""
    import mlx.core as mx

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "graph.dot"
        mx.export_to_dot(str(path), *outputs)
        labels = re.findall(r'\[label ="([^"]+)", shape=rectangle\]', path.read_text())
    return Counter(label for label in labels if label not in VIEW_PRIMITIVES)


def primitives_per_frame(pipeline, settings, frame: np.ndarray) -> dict:
    """The primitives one camera frame evaluates on this device under this pipeline's policy: a walk of the
    compiled frame's graph (the second frame's, feedback on), by kind, views left out."""
    import mlx.core as mx

    from mlx_sdxs.pipeline import MLXEngine
    from mlx_sdxs.recipe import Recipe

    class Unqueued(MLXEngine):
        """Keeps the frame's graph instead of evaluating it."""

        def start(self, arrays):
            self.graph = list(arrays)

    engine = Unqueued(pipeline)
    recipe = Recipe(engine, settings, PROMPT)
    recipe.submit(frame)
    mx.eval(engine.graph)
    recipe.submit(frame)
    counts = count_graph(engine.graph)
    return {"frame": sum(counts.values()), "top": dict(counts.most_common(12)), "kernels": pipeline.unet.ops.name,
            "dtype": str(pipeline.dtype)}

"""Where one frame's CPU time goes, per op class, in MLX and in ONNX Runtime, side by side.

    python -m bench.profile [--sizes 256,512] [--repeats 3] [--kernels cpu] [--out bench/results/runs]

MLX: the UNet and TAESD run with an op set that wraps the policy's ops and evaluates every op on its
own (its inputs first, so pending elementwise work is charged to "elementwise/other"). ONNX Runtime: the
exported graphs run with ORT's own profiler (`SessionOptions.enable_profiling`) and its per-node kernel
times are grouped into the same classes (an upsample fused into the conv after it counts as that conv in
MLX; ORT's Resize counts as "elementwise/other"). Each column is the median over `--repeats` frames after
one warm-up frame. Evaluating op by op costs MLX its lazy overlap, so the "sum" row can exceed the bench's
stage times a little.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import mlx_sdxs  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from bench.report import RUNS, run_stem
from mlx_sdxs import presets, runtime
from mlx_sdxs.models.ops import PortableOps, UsesOps, set_ops
from mlx_sdxs.weights import build_model, prepare

STAGES = ("encode", "unet", "decode")
OTHER = "elementwise/other"
LINEAR = "1×1 conv / linear"


def conv_class(out_c: int, kh: int, kw: int, in_c: int, stride: int) -> str:
    """The op class of a convolution: 1×1 ones are linear maps; k×k ones by kernel, stride and channels."""
    if (kh, kw) == (1, 1):
        return LINEAR
    return f"conv {kh}×{kw}/{stride} {in_c}→{out_c}"


class Timings:
    """Milliseconds per op class for one frame, charged by evaluating op by op."""

    def __init__(self):
        self.ms: dict[str, float] = defaultdict(float)

    def run(self, op_class: str, fn, *inputs):
        start = time.perf_counter()
        mx.eval(*[a for a in inputs if isinstance(a, mx.array)])  # pending work that fed this op
        middle = time.perf_counter()
        out = fn()
        mx.eval(out)
        end = time.perf_counter()
        self.ms[OTHER] += (middle - start) * 1000
        self.ms[op_class] += (end - middle) * 1000
        return out


class TimedOps(PortableOps):
    """The wrapped op set, each call evaluated and charged to its class."""

    def __init__(self, inner: PortableOps, timings: Timings):
        self.inner, self.timings, self.name = inner, timings, inner.name

    def conv2d(self, conv, x, residual=None, activation=None):
        out_c, kh, kw, in_c = conv.weight.shape
        return self.timings.run(conv_class(out_c, kh, kw, in_c, conv.stride[0]),
                                lambda: self.inner.conv2d(conv, x, residual, activation), x, residual)

    def upsample_conv2d(self, conv, x, size):
        out_c, kh, kw, in_c = conv.weight.shape  # the conv's class: ORT's upsample is a Resize, an "other" op
        return self.timings.run(conv_class(out_c, kh, kw, in_c, conv.stride[0]),
                                lambda: self.inner.upsample_conv2d(conv, x, size), x)

    def linear(self, layer, x, residual=None):
        return self.timings.run(LINEAR, lambda: self.inner.linear(layer, x, residual), x, residual)

    def layer_norm(self, norm, x):
        return self.timings.run("norm", lambda: self.inner.layer_norm(norm, x), x)

    def group_norm(self, norm, x, with_silu=False):
        return self.timings.run("norm", lambda: self.inner.group_norm(norm, x, with_silu), x)

    def attention(self, q, k, v, scale, causal=False):
        return self.timings.run("attention", lambda: self.inner.attention(q, k, v, scale, causal), q, k, v)

    def silu(self, x):
        return self.timings.run(OTHER, lambda: self.inner.silu(x), x)

    def gelu(self, x):
        return self.timings.run(OTHER, lambda: self.inner.gelu(x), x)

    def geglu(self, value, gate):
        return self.timings.run(OTHER, lambda: self.inner.geglu(value, gate), value, gate)


def model_ops(model: nn.Module) -> PortableOps:
    """The op set the kernel policy gave `model`."""
    return next(m.ops for _, m in model.named_modules() if isinstance(m, UsesOps))


def profile_mlx(preset: str, size: int, repeats: int, kernels: str) -> tuple[dict[str, dict[str, float]], str]:
    """{stage: {class: median ms}} for one frame at render size `size`, and the op set's name."""
    configs = presets.configs(preset)
    unet = prepare(build_model(configs["unet"], "unet"), mx.float32, kernels)
    vae = prepare(build_model(configs["vae"], "vae"), mx.float32, kernels)
    ops_name = model_ops(unet).name
    side = size // 8
    image = mx.random.uniform(-1, 1, (1, size, size, 3))
    latent = mx.random.normal((1, side, side, unet.config.in_channels))
    context = mx.random.normal((1, 77, unet.config.down_levels[0].cross_attention_dim))
    mx.eval(image, latent, context)
    stages = {"encode": (vae, lambda: vae.encode(image)), "unet": (unet, lambda: unet(latent, 999, context)),
              "decode": (vae, lambda: vae.decode(latent))}
    result = {}
    for stage, (model, call) in stages.items():
        inner = model_ops(model)
        frames = []
        for i in range(repeats + 1):
            timings = Timings()
            set_ops(model, TimedOps(inner, timings))
            out = call()
            timings.run(OTHER, lambda: out)  # what is left after the last timed op
            if i:  # the first frame compiles and allocates
                frames.append(dict(timings.ms))
        set_ops(model, inner)
        result[stage] = _median_per_class(frames)
    return result, ops_name


def ort_class(event: dict) -> str:
    """The op class of one ORT node-kernel event (its op type and input shapes)."""
    args = event["args"]
    op, shapes = args["op_name"], [next(iter(s.values())) for s in args.get("input_type_shape", [])]
    if op in ("Conv", "FusedConv") and len(shapes) > 1 and len(shapes[1]) == 4:
        out_c, in_c, kh, kw = shapes[1]
        out_shapes = [next(iter(s.values())) for s in args.get("output_type_shape", [])]
        stride = shapes[0][2] // out_shapes[0][2] if out_shapes and out_shapes[0][2] else 1
        return conv_class(out_c, kh, kw, in_c, stride)
    if op in ("Gemm", "MatMul", "FusedMatMul", "MatMulNBits"):
        # q·kᵀ and weights·v multiply two activations with batch dims; a linear layer has a 2-D weight.
        return "attention" if len(shapes) > 1 and len(shapes[1]) > 2 else LINEAR
    if op in ("Softmax", "Attention", "MultiHeadAttention"):
        return "attention"
    if op in ("InstanceNormalization", "GroupNorm", "GroupNormalization", "LayerNormalization",
              "SkipLayerNormalization", "SimplifiedLayerNormalization"):
        return "norm"
    return OTHER


def profile_ort(export_dir: Path, repeats: int, threads: int) -> dict[str, dict[str, float]]:
    """{stage: {class: median ms}} from ORT's profiler on an export folder, as the onnx backend runs it."""
    import onnxruntime as ort

    from mlx_sdxs.backends.exported import ExportManifest

    manifest = ExportManifest.load(export_dir, "onnx")
    result = {}
    for stage, component in zip(STAGES, ("vae_encoder", "unet", "vae_decoder")):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        with tempfile.TemporaryDirectory() as folder:
            options.profile_file_prefix = str(Path(folder) / component)
            session = ort.InferenceSession(str(export_dir / manifest.files[component]), options,
                                           providers=["CPUExecutionProvider"])
            rng = np.random.default_rng(0)
            feeds = {i.name: rng.standard_normal(manifest.inputs[component][i.name]).astype(np.float32)
                     for i in session.get_inputs()}
            for _ in range(repeats + 1):
                session.run(None, feeds)
            events = json.loads(Path(session.end_profiling()).read_text())
        runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
        frames = []
        for run in runs[1:]:  # the first run allocates
            ms: dict[str, float] = defaultdict(float)
            for e in events:
                if (e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                        and run["ts"] <= e["ts"] <= run["ts"] + run["dur"]):
                    ms[ort_class(e)] += e["dur"] / 1000
            ms["(run total)"] = run["dur"] / 1000
            frames.append(dict(ms))
        result[stage] = _median_per_class(frames)
    return result


def _median_per_class(frames: list[dict[str, float]]) -> dict[str, float]:
    classes = {c for f in frames for c in f}
    return {c: statistics.median(f.get(c, 0.0) for f in frames) for c in classes}


def _class_order(name: str) -> tuple:
    """Convolutions first (by channel count), then linear, attention, norm, the rest."""
    if name.startswith("conv"):
        return (0, int(name.split()[-1].split("→")[0]), name)
    return ({LINEAR: 1, "attention": 2, "norm": 3, OTHER: 4}.get(name, 5), 0, name)


def markdown(profiles: dict, machine: str) -> str:
    """One table per size and stage: MLX ms, ORT ms and their ratio per class."""
    lines = [f"Per-op-class CPU profile of one frame ({machine}). Median of the timed frames, ms.", ""]
    for size, stages in profiles.items():
        lines.append(f"## {size}×{size} (MLX op set: {stages['ops']})")
        totals = {"mlx": 0.0, "ort": 0.0}
        for stage in STAGES:
            mlx_ms, ort_ms = stages["mlx"][stage], stages["ort"][stage]
            lines += ["", f"### {stage}", "", "| op class | MLX ms | ORT ms | MLX ÷ ORT |", "|---|---|---|---|"]
            classes = sorted(({*mlx_ms, *ort_ms} - {"(run total)"}), key=_class_order)
            for c in classes:
                a, b = mlx_ms.get(c, 0.0), ort_ms.get(c, 0.0)
                lines.append(f"| {c} | {a:.1f} | {b:.1f} | {a / b:.2f} |" if b else f"| {c} | {a:.1f} | {b:.1f} | — |")
            a, b = sum(mlx_ms.values()), sum(v for c, v in ort_ms.items() if c != "(run total)")
            lines.append(f"| **sum** | **{a:.1f}** | **{b:.1f}** (run {ort_ms.get('(run total)', 0):.1f}) | "
                         f"**{a / b:.2f}** |")
            totals["mlx"] += a
            totals["ort"] += ort_ms.get("(run total)", b)
        lines += ["", f"{size}: MLX {totals['mlx']:.0f} ms vs ORT {totals['ort']:.0f} ms for encode+UNet+decode "
                  f"({totals['mlx'] / totals['ort']:.2f}×).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=presets.DEFAULT)
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernels", default="cpu", help="MLX kernel policy to profile (portable, cpu)")
    parser.add_argument("--out", type=Path, default=RUNS)
    args = parser.parse_args(argv)
    from bench.inputs import prepare_checkpoint
    from mlx_sdxs.backends import BackendChoice, export_folder
    from mlx_sdxs.recipe import RecipeSettings

    runtime.reserve_cpu_buffer_cache()
    threads = os.cpu_count() or 1
    source, _ = prepare_checkpoint(args.preset)
    profiles = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        # The ONNX export of this size, made once (cached under the weights folder, as the onnx backend's).
        export_dir = export_folder(BackendChoice(backend="onnx", model=str(source)), source,
                                   RecipeSettings(render_size=size), presets.controlnet_folder(source))
        mlx_profile, ops_name = profile_mlx(args.preset, size, args.repeats, args.kernels)
        profiles[size] = {"mlx": mlx_profile, "ort": profile_ort(export_dir, args.repeats, threads), "ops": ops_name}
        print(markdown({size: profiles[size]}, f"{size}², so far"), flush=True)
    from mlx_sdxs import native

    info = mx.device_info()
    machine = (f"{info.get('device_name')}, {threads} threads; MLX {mx.__version__} ({ops_name} ops, native: "
               f"{native.status()}); onnxruntime {__import__('onnxruntime').__version__}, {args.preset}")
    table = markdown(profiles, machine)
    path = run_stem(args.out, "cpu-profile").with_suffix(".md")
    path.write_text(table)
    print(f"bench: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MLX vs PyTorch vs ONNX Runtime vs CoreML on the same weights, frames and loop, side by side.

    python -m bench.run [--backends mlx,torch,onnx,coreml] [--sizes 256,512] [--checkpoint DIR]

All backends run in one process, interleaved in rounds, so the machine's noise hits them alike.
Per backend and render size: per-stage time (median and p90 after warm-up), standalone FPS, AI FPS
inside the 3-thread loop, memory, UNet GFLOP/s (FLOPs counted with torch's FlopCounterMode on the
diffusers UNet), threads, and ratios against MLX; plus the MLX primitives one frame evaluates under
the portable kernels (a GPU launch-count proxy). Writes JSON, markdown and PNG charts to --out
(`inputs.py` prepares, `measure.py` times, `counts.py` counts, `system.py` describes the machine, `report.py`
writes tables, `charts.py` draws).

Without --checkpoint it builds (once, cached under weights/) a random-weight checkpoint in the
SDXS-512-0.9 shape: the timings of random and trained weights are the same. A preset with a ControlNet
(`--preset sdxs-512-dreamshaper-sketch`) runs every backend twice, on the plain base model and as
`NAME+controlnet` (control image → ControlNet + UNet → decode), side by side.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench.report import RUNS, write_results

OPENBLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def reexec_without_openblas_overrides(module: str = "bench.run") -> None:
    """These variables pin OpenBLAS to Haswell kernels on some machines; users' machines set nothing.

    They are read when OpenBLAS loads, so the bench restarts itself without them (tests keep them).
    """
    if any(v in os.environ for v in OPENBLAS_VARIABLES):
        env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_VARIABLES}
        env["MLX_SDXS_BENCH_UNSET_OPENBLAS"] = ",".join(v for v in OPENBLAS_VARIABLES if v in os.environ)
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mlx_sdxs import presets

    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="mlx,torch,onnx,coreml",
                        help="comma-separated: mlx, mlx-q8, mlx-q4 (MLX with nn.quantize on the UNet), torch, "
                             "torch-graph (the frame as one CUDA graph; CUDA only), onnx, coreml")
    parser.add_argument("--sizes", default="256,512", help="render sizes, comma-separated (multiples of 64)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="diffusers checkpoint folder (default: random SDXS)")
    parser.add_argument("--preset", default=presets.DEFAULT,
                        help=f"shape of the random checkpoint (default {presets.DEFAULT})")
    parser.add_argument("--frames", type=int, default=6, help="timed frames per backend and size")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up frames per backend and size")
    parser.add_argument("--loop-frames", type=int, default=6,
                        help="AI frames through the 3-thread loop fed by an unpaced replay source (0: skip)")
    parser.add_argument("--images", type=Path, default=None, help="folder of frames (default ../shared/data/images, "
                        "else the synthetic scene)")
    parser.add_argument("--dtype", default="auto", help="MLX dtype (auto: float16 on a GPU, float32 on the CPU)")
    parser.add_argument("--kernels", default=None, help="MLX kernel policy (default $MLX_SDXS_KERNELS or auto)")
    parser.add_argument("--device", default=None, help="torch device (cpu, cuda, mps) / ONNX provider (cpu, cuda)")
    parser.add_argument("--torch-dtype", default="auto", help="torch dtype (auto: float32 on cpu, float16 on cuda/mps)")
    parser.add_argument("--no-primitives", dest="primitives", action="store_false",
                        help="skip the MLX primitive count of a compiled frame (it loads the model once more)")
    parser.add_argument("--out", type=Path, default=RUNS)
    parser.add_argument("--keep-openblas-env", action="store_true", help="do not unset OPENBLAS_CORETYPE/L2_SIZE")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.keep_openblas_env:
        reexec_without_openblas_overrides()
    import mlx_sdxs  # noqa: F401  (fast BLAS before mlx.core)
    from bench.charts import write_charts
    from bench.counts import primitives_per_frame
    from bench.inputs import load_frames, prepare_variants
    from bench.measure import measure_size
    from bench.report import markdown
    from bench.system import system_info
    from mlx_sdxs import runtime
    from mlx_sdxs.pipeline import SDXSPipeline
    from mlx_sdxs.recipe import RecipeSettings

    runtime.select_kernels(args.kernels)
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    sizes = [int(s) for s in args.sizes.split(",")]
    frames, frames_note = load_frames(args.images)
    variants = prepare_variants(args.preset, args.checkpoint)
    rows = [name + suffix for name in names for suffix in variants]
    report = {"system": system_info(args, frames_note), "sizes": {}, "primitives": {}}
    for size in sizes:
        print(f"bench: render size {size}…", flush=True)
        report["sizes"][str(size)] = measure_size(size, rows, frames, variants, args)
        if args.primitives and any(n.startswith("mlx") for n in names):
            for suffix, (_, converted) in variants.items():
                pipeline = SDXSPipeline.from_weights(converted, runtime.parse_dtype(args.dtype), kernels=args.kernels)
                report["primitives"][f"{size}{suffix}"] = primitives_per_frame(
                    pipeline, RecipeSettings(render_size=size), frames[0])
                del pipeline
        print(markdown(report), flush=True)
    write_results(args.out, "bench", report, markdown(report), write_charts)
    return 0


if __name__ == "__main__":
    sys.exit(main())

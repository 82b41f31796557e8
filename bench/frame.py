"""One frame, every way it can run: where a GPU frame's time goes.

    python -m bench.frame [--sizes 256,512] [--frames 30] [--torch] [--env MLX_USE_CUDA_GRAPHS=0 ...]

On the same random SDXS-512-0.9-shaped weights and frames, per render size:
- MLX staged: the recipe's stages evaluated one after another, uncompiled (what `profile_stages` runs);
- MLX compiled: the whole frame as one `mx.compile`d step, each frame waited for (latency);
- MLX in flight: the compiled step with frame N+1 submitted before frame N is read back (what the camera
  loop does: the throughput);
- with --torch: torch eager and torch with the same frame step captured as one CUDA graph (CUDA only).
Each row: median ms per frame, the host ms a frame costs (fit, upload, building and queueing it), and for
MLX the primitives one frame evaluates on this device (a walk of the compiled frame's graph, views left
out). Each `--env NAME=VALUE` reruns the MLX rows in a child process with that variable set (MLX reads
its settings once): e.g. `MLX_MAX_OPS_PER_BUFFER=1000` (operations per command buffer / CUDA graph before
it is committed) or `MLX_USE_CUDA_GRAPHS=0` (CUDA kernels launched one by one instead of recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.inputs import PROMPT
from bench.report import RUNS, run_stem

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.frame", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,512", help="render sizes, comma-separated")
    parser.add_argument("--frames", type=int, default=30, help="timed frames per variant")
    parser.add_argument("--torch", action="store_true", help="also torch eager and, on CUDA, a CUDA graph")
    parser.add_argument("--kernels", default=None, help="MLX kernel policy (default $MLX_SDXS_KERNELS or auto)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="rerun the MLX rows in a child process with this environment variable set (repeatable)")
    parser.add_argument("--mlx-only-json", type=Path, default=None, help=argparse.SUPPRESS)  # a child's output
    parser.add_argument("--out", type=Path, default=RUNS)
    return parser.parse_args(argv)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def time_stream(stream, frames: list, count: int, in_flight: bool) -> dict:
    """ms per frame and host ms per frame of `count` frames through `stream` (already warm)."""
    host = []
    start = time.perf_counter()
    pending = None
    for i in range(count):
        submitted = time.perf_counter()
        current = stream.submit(frames[i % len(frames)])
        host.append(1000 * (time.perf_counter() - submitted))
        if not in_flight:
            stream.collect(current)
        elif pending is not None:
            stream.collect(pending)
        pending = current if in_flight else None
    if pending is not None:
        stream.collect(pending)
    return {"ms": 1000 * (time.perf_counter() - start) / count, "host_ms": _median(host)}


def time_latency(stream, frames: list, count: int) -> dict:
    """Median ms of single frames (each waited for), and median host ms."""
    totals, host = [], []
    for i in range(count):
        start = time.perf_counter()
        pending = stream.submit(frames[i % len(frames)])
        host.append(1000 * (time.perf_counter() - start))
        stream.collect(pending)
        totals.append(1000 * (time.perf_counter() - start))
    return {"ms": _median(totals), "host_ms": _median(host)}


def time_staged(stream, frames: list, count: int) -> dict:
    stream.profile_stages = True
    stages: dict[str, list[float]] = {}
    for i in range(count):
        stream.process(frames[i % len(frames)])
        for stage, ms in stream.last_stage_ms.items():
            stages.setdefault(stage, []).append(ms)
    stream.profile_stages = False
    medians = {stage: round(_median(v), 2) for stage, v in stages.items()}
    return {"ms": sum(medians.values()), "stages_ms": medians}


def measure_mlx(sizes: list[int], frames: list, count: int, args: argparse.Namespace) -> dict:
    import mlx.core as mx

    from bench.counts import primitives_per_frame
    from bench.inputs import prepare_checkpoint
    from mlx_sdxs import presets, runtime
    from mlx_sdxs.pipeline import SDXSPipeline
    from mlx_sdxs.recipe import RecipeSettings

    runtime.select_kernels(args.kernels)
    _, converted = prepare_checkpoint(presets.DEFAULT)
    pipeline = SDXSPipeline.from_weights(converted, name=f"{presets.DEFAULT} (random)")
    rows = {}
    for size in sizes:
        settings = RecipeSettings(render_size=size)
        stream = pipeline.stream(settings, PROMPT)
        started = time.perf_counter()
        stream.warmup(3)
        warm_s = time.perf_counter() - started
        rows[size] = {
            "device": runtime.describe(pipeline.dtype)["device"], "engine": stream.name,
            "warmup_s": round(warm_s, 2),
            "mlx staged": time_staged(stream, frames, max(5, count // 3)),
            "mlx compiled": time_latency(stream, frames, count),
            "mlx in flight": time_stream(stream, frames, count, in_flight=True),
            "primitives": primitives_per_frame(pipeline, settings, frames[0]),
            "peak_memory_mb": round(mx.get_peak_memory() / 2**20),
        }
        print(f"bench.frame: mlx @ {size}: {json.dumps(rows[size])}", flush=True)
        stream.close()
    return rows


def measure_torch(sizes: list[int], frames: list, count: int) -> dict:
    import torch

    from bench.inputs import prepare_checkpoint
    from mlx_sdxs import presets
    from mlx_sdxs.backends.torch_backend import torch_stream
    from mlx_sdxs.recipe import RecipeSettings

    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint, _ = prepare_checkpoint(presets.DEFAULT)
    dtype = torch.float16 if device == "cuda" else torch.float32
    rows: dict = {}
    for size in sizes:
        rows[size] = {}
        for graph in ([False, True] if device == "cuda" else [False]):
            stream = torch_stream(checkpoint, RecipeSettings(render_size=size), device, dtype, PROMPT, cuda_graph=graph)
            stream.warmup(3)
            name = "torch cuda graph" if graph else f"torch {device}"
            rows[size][name] = {**time_latency(stream, frames, count), "engine": stream.name}
            rows[size][name + " in flight"] = time_stream(stream, frames, count, in_flight=True)
            print(f"bench.frame: {name} @ {size}: {rows[size][name]}", flush=True)
            stream.close()
    return rows


def env_variants(settings: list[str], args: argparse.Namespace) -> dict:
    """The MLX rows again, in a child process per NAME=VALUE setting."""
    results = {}
    for i, setting in enumerate(settings):
        name, _, value = setting.partition("=")
        out = args.out / f".frame-env-{i}.json"
        command = [sys.executable, "-m", "bench.frame", "--sizes", args.sizes, "--frames", str(args.frames),
                   "--mlx-only-json", str(out)] + (["--kernels", args.kernels] if args.kernels else [])
        done = subprocess.run(command, env={**os.environ, name: value}, timeout=600)
        if done.returncode == 0 and out.is_file():
            results[setting] = json.loads(out.read_text())
            out.unlink()
        else:
            results[setting] = {"error": f"exit status {done.returncode}"}
    return results


def markdown(report: dict) -> str:
    lines = [f"Device: {report['device']}; MLX {report['mlx_version']} ({report['engine']}); frames: {report['frames']}.",
             "", "| size | variant | ms / frame | host ms / frame | FPS | MLX primitives |", "|---|---|---|---|---|---|"]
    for size, row in report["mlx"].items():
        for variant in ("mlx staged", "mlx compiled", "mlx in flight"):
            entry = row[variant]
            primitives = row["primitives"]["frame"] if variant != "mlx staged" else ""
            host = f"{entry['host_ms']:.2f}" if "host_ms" in entry else ""
            lines.append(f"| {size} | {variant} | {entry['ms']:.2f} | {host} | {1000 / entry['ms']:.1f} | {primitives} |")
        for variant, entry in report.get("torch", {}).get(size, {}).items():
            lines.append(f"| {size} | {variant} | {entry['ms']:.2f} | {entry['host_ms']:.2f} | "
                         f"{1000 / entry['ms']:.1f} | |")
        for setting, rows in report.get("env", {}).items():
            entry = rows.get(size)
            if entry:
                for variant in ("mlx compiled", "mlx in flight"):
                    lines.append(f"| {size} | {variant}, {setting} | {entry[variant]['ms']:.2f} | "
                                 f"{entry[variant]['host_ms']:.2f} | {1000 / entry[variant]['ms']:.1f} | |")
    for size, row in report["mlx"].items():
        lines.append(f"\n{size}: staged per stage {row['mlx staged']['stages_ms']}; primitives by kind "
                     f"{row['primitives']['top']}; warm-up {row['warmup_s']} s; peak memory {row['peak_memory_mb']} MB")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import mlx_sdxs  # noqa: F401  (fast BLAS before mlx.core)
    import mlx.core as mx

    from bench.inputs import load_frames

    sizes = [int(s) for s in args.sizes.split(",")]
    frames, note = load_frames(None)
    mlx_rows = measure_mlx(sizes, frames, args.frames, args)
    if args.mlx_only_json is not None:
        args.mlx_only_json.write_text(json.dumps({str(k): v for k, v in mlx_rows.items()}))
        return 0
    first = next(iter(mlx_rows.values()))
    report = {"device": first["device"], "engine": first["engine"], "mlx_version": mx.__version__, "frames": note,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "mlx": {str(k): v for k, v in mlx_rows.items()}}
    if args.torch:
        report["torch"] = {str(k): v for k, v in measure_torch(sizes, frames, args.frames).items()}
    if args.env:
        report["env"] = env_variants(args.env, args)
    stem = run_stem(args.out, "frame")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"bench.frame: wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measuring: the backends on the same weights and frames, interleaved in rounds — per-stage times, standalone
and loop FPS, memory, threads — and each row's summary (with its UNet FLOP/s, `counts.unet_flops`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.counts import unet_flops
from bench.inputs import CONTROLNET_SUFFIX, PROMPT, ReplaySource


# --- backends --------------------------------------------------------------------------------------
def make_backend(name: str, size: int, checkpoint: Path, converted: Path, args: argparse.Namespace):
    """Build one backend (a row name: the backend, and CONTROLNET_SUFFIX for a ControlNet model's) on the bench's
    weights, or return the reason it cannot run here."""
    from mlx_sdxs import runtime
    from mlx_sdxs.backends import BackendChoice, open_backend
    from mlx_sdxs.errors import SDXSError
    from mlx_sdxs.recipe import RecipeSettings

    settings = RecipeSettings(render_size=size)
    name = name.removesuffix(CONTROLNET_SUFFIX)
    try:
        if name.startswith("mlx"):
            import mlx.nn as nn

            from mlx_sdxs.pipeline import SDXSPipeline

            pipeline = SDXSPipeline.from_weights(converted, runtime.parse_dtype(args.dtype), name=args.preset,
                                                 kernels=args.kernels)
            if name in ("mlx-q8", "mlx-q4"):
                nn.quantize(pipeline.unet, bits=int(name[-1]))
            return pipeline.stream(settings, PROMPT)
        if name == "torch-graph":
            from mlx_sdxs.backends.torch_backend import torch_dtype, torch_stream

            device = args.device or "cuda"
            return torch_stream(checkpoint, settings, device, torch_dtype(args.torch_dtype, device), PROMPT,
                                cuda_graph=True)
        choice = BackendChoice(backend=name, model=str(checkpoint), device=args.device, dtype=args.torch_dtype)
        return open_backend(choice, settings, PROMPT)
    except (SDXSError, ImportError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"


# --- measurement -----------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def variant(name: str) -> str:
    """The row's model variant: CONTROLNET_SUFFIX or ""."""
    return CONTROLNET_SUFFIX if name.endswith(CONTROLNET_SUFFIX) else ""


def measure_size(size: int, names: list[str], frames: list, variants: dict[str, tuple[Path, Path]],
                 args: argparse.Namespace) -> dict:
    """Every row (a backend name, with CONTROLNET_SUFFIX for the ControlNet model's) at one render size; ratios
    are against the MLX row of the same model."""
    from mlx_sdxs.backends import compute_threads
    from mlx_sdxs.camera.loop import run_loop
    from mlx_sdxs.recipe import STAGES

    backends, results = {}, {}
    for name in names:
        before = rss_mb()
        backend = make_backend(name, size, *variants[variant(name)], args)
        if isinstance(backend, str):
            results[name] = {"skipped": backend}
            print(f"bench: {name} @ {size}: skipped ({backend})", flush=True)
            continue
        backend.warmup()
        backends[name] = backend
        results[name] = {"load_rss_mb": round(rss_mb() - before, 1), "stages_ms": {s: [] for s in STAGES},
                         "frame_ms": [], "standalone_ms": [], "backend": backend.name,
                         "threads": compute_threads(backend)}
    # Rounds of a few frames per backend, backend after backend: the machine's noise hits every backend
    # alike, while each backend's thread pool (OpenBLAS, OpenMP, ORT) gets the cores to itself within a round
    # (frame-by-frame alternation made torch's OpenMP threads fight OpenBLAS's spinning workers). Each round
    # opens with one untimed frame: the previous backend's idle threads still spin for a while after its last
    # frame, and whichever backend came next paid for them (MLX's encode measured 102 ms after ORT, 80 alone).
    per_round = max(1, args.frames // 3)
    for name, backend in backends.items():
        for i in range(args.warmup):
            backend.process(frames[i % len(frames)])
    for first in range(0, args.frames, per_round):
        for name, backend in backends.items():
            backend.process(frames[first % len(frames)])  # the round's untimed settling frame
            for i in range(first, min(first + per_round, args.frames)):
                frame = frames[i % len(frames)]
                backend.profile_stages = True
                backend.process(frame)
                for stage, ms in backend.last_stage_ms.items():
                    results[name]["stages_ms"][stage].append(ms)
                results[name]["frame_ms"].append(sum(backend.last_stage_ms.values()))
                backend.profile_stages = False
                start = time.perf_counter()
                backend.process(frame)
                results[name]["standalone_ms"].append((time.perf_counter() - start) * 1000)
            print(f"bench: {name} @ {size}: {len(results[name]['frame_ms'])}/{args.frames} frames, "
                  f"last {results[name]['frame_ms'][-1]:.0f} ms", flush=True)
    for name, backend in backends.items():
        if args.loop_frames:
            # Warm-up on the loop's own inference thread: MLX compiles per thread/stream on first use.
            stats = run_loop(ReplaySource(frames), backend, None, warmup=True, max_results=args.loop_frames)
            results[name]["loop"] = stats.as_dict()
        backend.close()
    flops = {suffix: unet_flops(source, size) for suffix, (source, _) in variants.items()}
    summary = {name: result if "skipped" in result else summarise(result, flops[variant(name)])
               for name, result in results.items()}
    for suffix in variants:
        ran = {name: entry for name, entry in summary.items() if "skipped" not in entry and variant(name) == suffix}
        reference = ran.get("mlx" + suffix) or next(iter(ran.values()), None)
        for entry in ran.values():
            # > 1 means slower than MLX: this backend's frame time over MLX's.
            entry["time_vs_mlx"] = entry["encode_unet_decode_ms"] / reference["encode_unet_decode_ms"]
    return summary


def summarise(result: dict, unet_flop: float | None) -> dict:
    """One row's table entry from its raw timings (and the FLOPs of its UNet stage, when counted)."""
    from mlx_sdxs.recipe import MODEL_STAGES

    stages = {s: {"median": percentile(v, 50), "p90": percentile(v, 90), "min": min(v, default=None)}
              for s, v in result["stages_ms"].items()}
    # Per-frame enc+UNet+dec: its minimum is the machine's quiet-time figure (shared hosts have slow spells).
    model_ms = [sum(t) for t in zip(*(result["stages_ms"][s] for s in MODEL_STAGES))]
    standalone_fps = 1000.0 / percentile(result["standalone_ms"], 50)
    entry = {
        "backend": result["backend"],
        "threads": result["threads"],
        "stages_ms": stages,
        "frame_ms_median": percentile(result["frame_ms"], 50),
        "frame_ms_p90": percentile(result["frame_ms"], 90),
        "encode_unet_decode_ms": sum(stages[s]["median"] for s in MODEL_STAGES),
        "encode_unet_decode_best_ms": min(model_ms),
        "standalone_fps": standalone_fps,
        "load_rss_mb": result["load_rss_mb"],
    }
    if "loop" in result:
        entry["loop"] = result["loop"]
        entry["loop_fps"] = result["loop"]["ai_fps"]
        entry["loop_vs_standalone"] = result["loop"]["ai_fps"] / standalone_fps
    if unet_flop:
        entry["unet_gflop"] = unet_flop / 1e9
        entry["unet_gflops_per_s"] = unet_flop / 1e9 / (stages["unet"]["median"] / 1000)
    return entry

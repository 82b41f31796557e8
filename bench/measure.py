"""Measuring: the backends on the same weights and frames, per-stage times, loop FPS, memory, FLOPs, and
the MLX graph's primitive count per frame (a GPU launch-count proxy that needs no GPU)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

PROMPT = "a watercolor painting"
#: Graph nodes that only re-describe memory (no kernel of their own on a GPU) — left out of the count.
VIEW_PRIMITIVES = {"Reshape", "Transpose", "Slice", "Broadcast", "BroadcastAxes", "AsStrided", "ExpandDims",
                   "Squeeze", "Flatten", "Unflatten", "View", "StopGradient"}


# --- inputs ----------------------------------------------------------------------------------------
def load_frames(folder: Path | None) -> tuple[list, str]:
    import cv2

    from mlx_sdxs.camera.sources import SyntheticSource

    given = folder is not None
    folder = folder or Path(__file__).resolve().parents[2] / "shared" / "data" / "images"
    files = sorted(f for f in folder.glob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg")) if folder.is_dir() else []
    frames = [frame for frame in (cv2.imread(str(f)) for f in files) if frame is not None]
    if given and not frames:
        raise SystemExit(f"bench: --images {folder}: no readable .png/.jpg images there")
    if frames:
        return frames, f"{len(frames)} photos from {folder}"
    source = SyntheticSource(640, 480, 0)
    return [source.read() for _ in range(8)], "8 frames of the synthetic scene"


#: The row suffix of a backend running a ControlNet model (its frame: control image → ControlNet + UNet → decode).
CONTROLNET_SUFFIX = "+controlnet"


def prepare_variants(args: argparse.Namespace) -> dict[str, tuple[Path, Path]]:
    """Row suffix → (diffusers checkpoint, converted folder). A preset that adds a ControlNet (e.g.
    sdxs-512-dreamshaper-sketch) gives two: its base model ("", the plain frame) and the model with its
    ControlNet (CONTROLNET_SUFFIX), so that every backend's ControlNet frame stands beside its plain one."""
    from mlx_sdxs import presets

    if args.checkpoint is not None:
        suffix = CONTROLNET_SUFFIX if presets.controlnet_folder(args.checkpoint) is not None else ""
        return {suffix: prepare_checkpoint(args)}
    base = presets.base(args.preset)
    if base is None:
        return {"": prepare_checkpoint(args)}
    return {"": prepare_checkpoint(argparse.Namespace(checkpoint=None, preset=base)),
            CONTROLNET_SUFFIX: prepare_checkpoint(args)}


def prepare_checkpoint(args: argparse.Namespace) -> tuple[Path, Path]:
    """(diffusers checkpoint, converted MLX folder): --checkpoint, else random weights in the preset's
    shape; built and converted once under the weights folder."""
    from mlx_sdxs import hub
    from mlx_sdxs.backends import random_checkpoint
    from mlx_sdxs.convert import convert_checkpoint

    source = args.checkpoint or random_checkpoint(args.preset)
    converted = hub.default_weights_root() / f"bench-{hub.model_slug(source)}-float32"
    if not hub.is_converted(converted):
        print(f"bench: converting {source} for MLX (once)…", flush=True)
        convert_checkpoint(source, converted)
    return source, converted


#: The loop's replay source runs far above any model's rate, so the loop FPS says what the loop can do (a 30 FPS
#: camera would cap every backend at 30); paced, not spinning, so it takes almost no CPU itself.
UNPACED_FPS = 1000.0


class ReplaySource:
    """Decoded frames replayed at a fixed rate: the loop measurement pays no decode/synthesis cost."""

    def __init__(self, frames: list, fps: float = UNPACED_FPS):
        from mlx_sdxs.camera.sources import Pacer

        self.name, self.fps, self.frames, self.count, self.pacer = "replay", fps, frames, 0, Pacer(fps)

    def read(self, stop=None):
        if not self.pacer.wait(stop):
            return None
        self.count += 1
        return self.frames[self.count % len(self.frames)]

    def close(self) -> None:
        pass


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
            backend = pipeline.stream(settings, PROMPT)
            backend.name = name
            return backend
        if name == "torch-graph":
            from mlx_sdxs.backends.torch_backend import torch_dtype, torch_stream

            device = args.device or "cuda"
            return torch_stream(checkpoint, settings, device, torch_dtype(args.torch_dtype, device), PROMPT,
                                cuda_graph=True)
        choice = BackendChoice(backend=name, model=str(checkpoint), device=args.device, dtype=args.torch_dtype)
        return open_backend(choice, settings, PROMPT)
    except (SDXSError, ImportError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"


def backend_threads(backend) -> int | None:
    """Threads the backend computes with (the bench reports them so the comparison is fair)."""
    engine = getattr(backend, "engine", None)
    if hasattr(engine, "threads"):
        return engine.threads
    if type(engine).__name__ == "TorchEngine":
        import torch

        return torch.get_num_threads()
    return os.cpu_count()


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

    recipe = Recipe(Unqueued(pipeline), settings, PROMPT)
    recipe.submit(frame)
    mx.eval(recipe.engine.graph)
    recipe.submit(frame)
    counts = count_graph(recipe.engine.graph)
    return {"frame": sum(counts.values()), "top": dict(counts.most_common(12)), "kernels": pipeline.unet.ops.name,
            "dtype": str(pipeline.dtype)}


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
                         "frame_ms": [], "standalone_ms": [], "backend": backend.engine.name,
                         "threads": backend_threads(backend)}
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


def system_info(args: argparse.Namespace, frames_note: str) -> dict:
    import mlx.core as mx

    from mlx_sdxs import __version__, _blas, native, runtime

    dtype = runtime.parse_dtype(args.dtype)
    described = runtime.describe(dtype)
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.machine(), "os": platform.platform(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "cpu": _cpu_name(),
        "mlx": mx.__version__, "mlx_device": described["device"], "mlx_sdxs": __version__,
        "mlx_blas": _blas.status(), "numpy": np.__version__,
        "dtype": described["dtype"], "kernels": described["kernels"], "kernels_requested": described["kernels_requested"],
        "native_kernels": native.status(),
        "openblas_env_unset_for_bench": os.environ.get("MLX_SDXS_BENCH_UNSET_OPENBLAS", "") or "none were set",
        "frames": frames_note, "preset": args.preset if args.checkpoint is None else str(args.checkpoint),
    }
    for package in ("torch", "diffusers", "onnxruntime", "coremltools"):
        try:
            info[package] = importlib.metadata.version(package)  # no import: coremltools is noisy off macOS
        except importlib.metadata.PackageNotFoundError:
            pass
    if args.device == "cuda" or runtime.on_cuda():
        try:
            import torch

            info["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
        except ImportError:
            pass
    try:
        from threadpoolctl import threadpool_info

        info["blas_kernels"] = sorted({f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')} "
                                       f"({p.get('num_threads')} threads)"
                                       for p in threadpool_info() if p.get("user_api") == "blas"})
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

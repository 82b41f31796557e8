"""MLX vs PyTorch vs ONNX Runtime vs CoreML on the same weights, frames and loop, side by side.

    python -m bench.run [--backends mlx,torch,onnx,coreml] [--sizes 256,512] [--checkpoint DIR]

All backends run in one process, interleaved frame by frame, so the machine's noise hits them alike.
Per backend and render size: per-stage time (median and p90 after warm-up), standalone FPS, FPS
inside the 3-thread loop, memory, UNet GFLOP/s (FLOPs counted with torch's FlopCounterMode on the
diffusers UNet) and ratios against MLX. Writes JSON, a markdown table and a PNG chart to --out.

Without --checkpoint it builds (once, cached under weights/) a random-weight checkpoint in the
SDXS-512-0.9 shape: the timings of random and trained weights are the same.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

OPENBLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
# The stages the models run; "enc+UNet+dec" sums them (pre/postprocessing is reported apart).
MODEL_STAGES = ("encode", "unet", "decode")


def _reexec_without_openblas_overrides() -> None:
    """These variables pin OpenBLAS to Haswell kernels on some machines; users' machines set nothing.

    They are read when OpenBLAS loads, so the bench restarts itself without them (tests keep them).
    """
    if any(v in os.environ for v in OPENBLAS_VARIABLES):
        env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_VARIABLES}
        env["MLX_SDXS_BENCH_UNSET_OPENBLAS"] = ",".join(v for v in OPENBLAS_VARIABLES if v in os.environ)
        os.execve(sys.executable, [sys.executable, "-m", "bench.run", *sys.argv[1:]], env)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="mlx,torch,onnx,coreml",
                        help="comma-separated: mlx, mlx-q8, mlx-q4 (MLX with nn.quantize on the UNet), torch, onnx, coreml")
    parser.add_argument("--sizes", default="256,512", help="render sizes, comma-separated (multiples of 64)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="diffusers checkpoint folder (default: random SDXS)")
    parser.add_argument("--preset", default="sdxs-512-0.9", help="shape of the random checkpoint (default sdxs-512-0.9)")
    parser.add_argument("--frames", type=int, default=6, help="timed frames per backend and size")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up frames per backend and size")
    parser.add_argument("--loop-frames", type=int, default=6, help="frames through the 3-thread loop (0: skip)")
    parser.add_argument("--images", type=Path, default=None, help="folder of frames (default ../shared/data/images, "
                        "else the synthetic scene)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, mps)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--keep-openblas-env", action="store_true", help="do not unset OPENBLAS_CORETYPE/L2_SIZE")
    return parser.parse_args(argv)


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


def prepare_checkpoint(args: argparse.Namespace) -> tuple[Path, Path]:
    """(diffusers checkpoint, converted MLX folder), building and converting once."""
    from mlx_sdxs import hub
    from mlx_sdxs.convert import convert_checkpoint

    root = hub.default_weights_root() / f"bench-random-{args.preset}"
    source = args.checkpoint
    if source is None:
        source = root / "diffusers"
        if not (source / "model_index.json").is_file():
            from mlx_sdxs.reference import write_random_checkpoint

            print(f"bench: building a random {args.preset}-shaped checkpoint in {source} (once)…", flush=True)
            write_random_checkpoint(source, args.preset)
    converted = (root if args.checkpoint is None else hub.default_weights_root() / f"bench-{source.name}") / "mlx-float32"
    if not hub.is_converted(converted):
        convert_checkpoint(source, converted)
    return source, converted


class ReplaySource:
    """Decoded frames replayed at a camera's rate: the loop measurement pays no decode/synthesis cost."""

    def __init__(self, frames: list, fps: float = 30.0):
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
def make_backend(name: str, size: int, source: Path, converted: Path, args: argparse.Namespace):
    """Build one backend, or return the reason it cannot run here."""
    from mlx_sdxs.backends.base import RecipeSettings
    from mlx_sdxs.errors import SDXSError

    settings = RecipeSettings(render_size=size)
    prompt = "a watercolor painting"
    try:
        if name.startswith("mlx"):
            import mlx.nn as nn

            from mlx_sdxs.backends.mlx_backend import MLXBackend
            from mlx_sdxs.pipeline import SDXSPipeline

            pipeline = SDXSPipeline.from_weights(converted, name=args.preset)
            if name in ("mlx-q8", "mlx-q4"):
                nn.quantize(pipeline.unet, bits=int(name[-1]))
            backend = MLXBackend(pipeline, settings, prompt)
            backend.name = name
            return backend
        if name == "torch":
            from mlx_sdxs.backends.torch_backend import TorchBackend

            return TorchBackend(source, settings, device=args.device, prompt=prompt)
        if name == "onnx":
            from mlx_sdxs.backends.onnx_backend import OnnxBackend

            exported = converted.parent / f"onnx-{size}"
            if not (exported / "manifest.json").is_file():
                from convert.onnx import export_onnx

                print(f"bench: exporting ONNX graphs at {size} (once)…", flush=True)
                export_onnx(source, exported, size)
            return OnnxBackend(exported, settings, prompt=prompt)
        if name == "coreml":
            from mlx_sdxs.backends.coreml import CoreMLBackend

            return CoreMLBackend(converted.parent / f"coreml-{size}", settings, prompt=prompt)
    except (SDXSError, ImportError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"unknown backend {name!r}"


def unet_flops(source: Path, size: int) -> float | None:
    """FLOPs of one UNet call at `size` (torch FlopCounterMode on the diffusers UNet), or None without torch."""
    try:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from mlx_sdxs.backends.torch_backend import load_unet
    except ImportError:
        return None
    unet = load_unet(source)
    latent = torch.zeros(1, unet.config.in_channels, size // 8, size // 8)
    text = torch.zeros(1, 77, unet.config.cross_attention_dim)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(latent, torch.tensor([999]), text)
    return float(counter.get_total_flops())


# --- measurement -----------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure_size(size: int, names: list[str], frames: list, source: Path, converted: Path,
                 args: argparse.Namespace) -> dict:
    from mlx_sdxs.backends.base import STAGES
    from mlx_sdxs.camera.loop import run_loop

    backends, results = {}, {}
    for name in names:
        before = rss_mb()
        backend = make_backend(name, size, source, converted, args)
        if isinstance(backend, str):
            results[name] = {"skipped": backend}
            print(f"bench: {name} @ {size}: skipped ({backend})", flush=True)
            continue
        backend.warmup()
        backends[name] = backend
        results[name] = {"load_rss_mb": round(rss_mb() - before, 1), "stages_ms": {s: [] for s in STAGES},
                         "frame_ms": [], "standalone_ms": []}
    # Rounds of a few frames per backend, backend after backend: the machine's noise hits every backend
    # alike, while each backend's thread pool (OpenBLAS, OpenMP, ORT) gets the cores to itself within a round
    # (frame-by-frame alternation made torch's OpenMP threads fight OpenBLAS's spinning workers).
    per_round = max(1, args.frames // 3)
    for name, backend in backends.items():
        for i in range(args.warmup):
            backend.process(frames[i % len(frames)])
    for first in range(0, args.frames, per_round):
        for name, backend in backends.items():
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
            stats = run_loop(ReplaySource(frames), backend, None, prompt=None, warmup=True, max_frames=args.loop_frames)
            results[name]["loop"] = stats.as_dict()
        backend.close()
    flops = unet_flops(source, size)
    summary = {}
    for name, result in results.items():
        if "skipped" in result:
            summary[name] = result
            continue
        stages = {s: {"median": percentile(v, 50), "p90": percentile(v, 90), "min": min(v, default=float("nan"))}
                  for s, v in result["stages_ms"].items()}
        # Per-frame enc+UNet+dec: its minimum is the machine's quiet-time figure (shared hosts have slow spells).
        model_ms = [sum(t) for t in zip(*(result["stages_ms"][s] for s in MODEL_STAGES))]
        standalone_fps = 1000.0 / percentile(result["standalone_ms"], 50)
        entry = {
            "stages_ms": stages,
            "frame_ms_median": percentile(result["frame_ms"], 50),
            "frame_ms_p90": percentile(result["frame_ms"], 90),
            "encode_unet_decode_ms": sum(stages[s]["median"] for s in MODEL_STAGES),
            "encode_unet_decode_best_ms": min(model_ms, default=float("nan")),
            "standalone_fps": standalone_fps,
            "load_rss_mb": result["load_rss_mb"],
        }
        if "loop" in result:
            entry["loop"] = result["loop"]
            entry["loop_fps"] = result["loop"]["ai_fps"]
            entry["loop_vs_standalone"] = result["loop"]["ai_fps"] / standalone_fps
        if flops:
            entry["unet_gflop"] = flops / 1e9
            entry["unet_gflops_per_s"] = flops / 1e9 / (stages["unet"]["median"] / 1000)
        summary[name] = entry
    ran = {name: entry for name, entry in summary.items() if "skipped" not in entry}
    reference = ran.get("mlx") or next(iter(ran.values()), None)
    for entry in ran.values():
        # > 1 means slower than MLX: this backend's frame time over MLX's.
        entry["time_vs_mlx"] = entry["encode_unet_decode_ms"] / reference["encode_unet_decode_ms"]
    return summary


def system_info(args: argparse.Namespace, frames_note: str) -> dict:
    import mlx.core as mx
    import numpy as np

    from mlx_sdxs import __version__, _blas

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.machine(), "os": platform.platform(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "cpu": _cpu_name(),
        "mlx": mx.__version__, "mlx_device": str(mx.default_device()), "mlx_sdxs": __version__,
        "mlx_blas": _blas.status(), "numpy": np.__version__, "dtype": "float32",
        "openblas_env_unset_for_bench": os.environ.get("MLX_SDXS_BENCH_UNSET_OPENBLAS", "") or "none were set",
        "frames": frames_note, "preset": args.preset if args.checkpoint is None else str(args.checkpoint),
    }
    for package in ("torch", "diffusers", "onnxruntime", "coremltools"):
        try:
            info[package] = importlib.metadata.version(package)  # no import: coremltools is noisy off macOS
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        from threadpoolctl import threadpool_info

        info["blas_kernels"] = sorted({f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')}"
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


# --- reporting -------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    info = report["system"]
    lines = [f"Device: {info['cpu']} ({info['cpu_count']} cores), {info['os']}; MLX {info['mlx']} on "
             f"{info['mlx_device']} with {info['mlx_blas']}; dtype {info['dtype']}; frames: {info['frames']}.", "",
             "| size | backend | encode ms | UNet ms | decode ms | enc+UNet+dec ms | best frame ms | × MLX time | "
             "standalone FPS | loop FPS | loop/standalone | UNet GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for size, backends in report["sizes"].items():
        for name, e in backends.items():
            if "skipped" in e:
                lines.append(f"| {size} | {name} | skipped: {e['skipped'][:80]} ||||||||||")
                continue
            s = e["stages_ms"]
            lines.append(
                f"| {size} | {name} | {s['encode']['median']:.0f} | {s['unet']['median']:.0f} | "
                f"{s['decode']['median']:.0f} | {e['encode_unet_decode_ms']:.0f} | {e['encode_unet_decode_best_ms']:.0f} | "
                f"{e.get('time_vs_mlx', 1):.2f} | "
                f"{e['standalone_fps']:.2f} | {e.get('loop_fps', float('nan')):.2f} | "
                f"{e.get('loop_vs_standalone', float('nan')):.2f} | {e.get('unet_gflops_per_s', float('nan')):.0f} |")
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    """Horizontal bars of enc+UNet+dec time per backend and size, drawn with OpenCV (no plotting dependency)."""
    import cv2
    import numpy as np

    rows = [(f"{size} {name}", e["encode_unet_decode_ms"]) for size, b in report["sizes"].items()
            for name, e in b.items() if "skipped" not in e]
    if not rows:
        return
    width, bar, left = 900, 28, 170
    image = np.full((40 + bar * len(rows) + 20, width, 3), 255, np.uint8)
    cv2.putText(image, "encode + UNet + decode, ms per frame (lower is better)", (10, 25), cv2.FONT_HERSHEY_SIMPLEX,
                0.6, (0, 0, 0), 1, cv2.LINE_AA)
    longest = max(ms for _, ms in rows)
    for i, (label, ms) in enumerate(rows):
        y = 40 + i * bar
        length = int((width - left - 90) * ms / longest)
        colour = (80, 160, 60) if "mlx" in label else (60, 110, 200)
        cv2.rectangle(image, (left, y + 4), (left + length, y + bar - 4), colour, -1)
        cv2.putText(image, label, (10, y + bar - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(image, f"{ms:.0f}", (left + length + 6, y + bar - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                    cv2.LINE_AA)
    cv2.imwrite(str(path), image)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.keep_openblas_env:
        _reexec_without_openblas_overrides()
    import mlx_sdxs  # noqa: F401  (fast BLAS before mlx.core)

    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    sizes = [int(s) for s in args.sizes.split(",")]
    frames, frames_note = load_frames(args.images)
    source, converted = prepare_checkpoint(args)
    report = {"system": system_info(args, frames_note), "sizes": {}}
    for size in sizes:
        print(f"bench: render size {size}…", flush=True)
        report["sizes"][str(size)] = measure_size(size, names, frames, source, converted, args)
        print(markdown(report), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"bench-{stamp}.json").write_text(json.dumps(report, indent=2, default=float))
    table = markdown(report)
    (args.out / f"bench-{stamp}.md").write_text(table)
    chart(report, args.out / f"bench-{stamp}.png")
    print(table)
    print(f"bench: wrote {args.out}/bench-{stamp}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

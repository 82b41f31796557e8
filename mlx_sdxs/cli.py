"""`mlx-sdxs`: txt2img, img2img, camera, convert, download, info, bench.

Thin by design: parse, build, run, save. Errors users can act on (`SDXSError`) print one line and
exit 1; Ctrl-C exits 130; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from mlx_sdxs import hub
from mlx_sdxs.errors import SDXSError

DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")


def _ranged(kind, low, high, name):
    """argparse type: a number in [low, high], the allowed range named in the error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a {kind.__name__}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} must be in [{low}, {high}], got {value}")
        return value

    return parse


def _size(text: str) -> int:
    value = _ranged(int, 64, 2048, "size")(text)
    if value % 64:
        raise argparse.ArgumentTypeError(f"size must be a multiple of 64 in [64, 2048], got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None,
                       help=f"Hub repo id ({', '.join(hub.KNOWN_MODELS)}), a local diffusers checkpoint, a converted "
                            f"weights folder, or 'random'/'random-tiny' (random weights, offline). Default: {hub.DEFAULT_MODEL}")
    group.add_argument("--vae", default=None, help="replace the checkpoint's VAE, e.g. madebyollin/taesd (as the seed does)")
    group.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                       help="weights/compute dtype; auto = float32 on CPU, float16 on a GPU")
    group.add_argument("--weights-dir", type=Path, default=None,
                       help="where converted weights live (default: $MLX_SDXS_WEIGHTS or ./weights)")
    group.add_argument("--offline", action="store_true", help="never contact the Hub; use the cache and local folders only")


def add_generation_arguments(parser: argparse.ArgumentParser, default_output: Path) -> None:
    parser.add_argument("--prompt", required=True, help="text prompt (CLIP reads 75 tokens; longer ones are "
                        "truncated with a notice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument("--size", type=_size, default=512, help="output side in pixels, multiple of 64 (default 512)")
    parser.add_argument("--output", "-o", type=Path, default=default_output,
                        help=f"PNG/JPEG/WebP file, written atomically (default {default_output})")
    add_model_arguments(parser)


def load_pipeline(args: argparse.Namespace, fallback_to_random: bool = False):
    """Build the pipeline the model flags describe; optionally fall back to random weights when offline."""
    import mlx.core as mx

    from mlx_sdxs.pipeline import SDXSPipeline

    dtype = None if args.dtype == "auto" else getattr(mx, args.dtype)
    model = args.model or hub.DEFAULT_MODEL
    try:
        pipeline = SDXSPipeline.from_pretrained(model, dtype=dtype, vae=args.vae, weights_root=args.weights_dir,
                                                offline=args.offline or None)
    except SDXSError as exc:
        if not (fallback_to_random and args.model is None):
            raise
        print(f"mlx-sdxs: {exc}", file=sys.stderr)
        print("mlx-sdxs: >>> falling back to RANDOM WEIGHTS in the SDXS-512-0.9 shape: NOT a trained model <<<",
              file=sys.stderr)
        pipeline = SDXSPipeline.random("random", dtype=dtype)
    if pipeline.label:
        print(f"mlx-sdxs: model {pipeline.name}: {pipeline.label}", file=sys.stderr)
    return pipeline


def _labelled(rgb, label: str | None):
    """Stamp random-weight outputs so no one mistakes them for a trained model's."""
    if not label:
        return rgb
    from mlx_sdxs.camera.display import draw_banner

    return draw_banner(rgb.copy(), label)


def cmd_txt2img(args: argparse.Namespace) -> int:
    from mlx_sdxs.imageio import write_image

    pipeline = load_pipeline(args)
    start = time.perf_counter()
    image = pipeline.txt2img(args.prompt, seed=args.seed, size=args.size)
    print(f"mlx-sdxs: {args.size}×{args.size} in {time.perf_counter() - start:.2f} s → {args.output}", file=sys.stderr)
    write_image(args.output, _labelled(image, pipeline.label))
    return 0


def cmd_img2img(args: argparse.Namespace) -> int:
    from mlx_sdxs.imageio import read_image, write_image

    image = read_image(args.input)
    pipeline = load_pipeline(args)
    start = time.perf_counter()
    result = pipeline.img2img(image, args.prompt, strength=args.strength, seed=args.seed, size=args.size)
    print(f"mlx-sdxs: {args.size}×{args.size} in {time.perf_counter() - start:.2f} s → {args.output}", file=sys.stderr)
    write_image(args.output, _labelled(result, pipeline.label))
    return 0


def cmd_camera(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from mlx_sdxs.camera.app import run_camera

    if args.render_size is None:
        # SDXS-512 is trained at 512; a CPU manages ~4x more frames at 256.
        args.render_size = 512 if mx.default_device() == mx.gpu or args.backend != "mlx" else 256
    return run_camera(args, make_camera_backend)


def make_camera_backend(args: argparse.Namespace):
    """The camera's inference stage: MLX unless `--backend` picks a comparison backend."""
    from mlx_sdxs.backends.base import RecipeSettings

    settings = RecipeSettings(render_size=args.render_size, feedback=args.feedback, seed=args.seed)
    prompt = args.prompt
    if args.backend == "mlx":
        from mlx_sdxs.backends.mlx_backend import MLXBackend

        return MLXBackend(load_pipeline(args, fallback_to_random=True), settings, prompt)
    if args.backend == "coreml":
        from mlx_sdxs.backends.coreml import CoreMLBackend

        return CoreMLBackend(args.coreml_dir, settings, compute_units=args.compute_units, prompt=prompt)
    from mlx_sdxs.backends.torch_backend import TorchBackend

    return TorchBackend(args.model, settings, device=args.device, prompt=prompt)


def cmd_convert(args: argparse.Namespace) -> int:
    from mlx_sdxs.convert import convert_checkpoint

    dtype = "float32" if args.dtype == "auto" else args.dtype
    source = hub.checkpoint_folder(args.source, args.offline or None)
    dst = args.output or (args.weights_dir or hub.default_weights_root()) / f"{source.resolve().name}-{dtype}"
    start = time.perf_counter()
    convert_checkpoint(source, dst, dtype=dtype)
    print(f"mlx-sdxs: converted {source} → {dst} ({dtype}) in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    dtype = "float32" if args.dtype == "auto" else args.dtype
    folder = hub.resolve(args.repo, dtype, args.vae, args.weights_dir, offline=None)
    print(f"mlx-sdxs: {args.repo} ready at {folder}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import platform
    import shutil

    import mlx.core as mx

    from mlx_sdxs import __version__, _blas
    from mlx_sdxs.pipeline import default_dtype, dtype_name

    print(f"mlx-sdxs {__version__} · MLX {mx.__version__} · Python {platform.python_version()} · {platform.platform()}")
    print(f"device: {mx.default_device()}  (default dtype {dtype_name(default_dtype())})")
    print(f"BLAS:   {_blas.status()}")
    if mx.default_device() == mx.cpu:
        # mx.compile builds its fused CPU kernels with the system g++ (SiLU, GroupNorm+SiLU, softmax).
        compiler = shutil.which("g++")
        print("fused CPU kernels: " + (f"compiled with {compiler}" if compiler else
                                       "uncompiled (no g++ on PATH; installing it makes SiLU/attention ~2x faster)"))
    root = args.weights_dir or hub.default_weights_root()
    models = hub.cached_models(root)
    print(f"converted models in {root}: " + ("none" if not models else ""))
    for name, size in models:
        print(f"  {name:50s} {size / 2**30:6.2f} GiB")
    return 0


def cmd_bench(bench_args: list[str]) -> int:
    """Forwarded whole to `bench.run` (its own parser owns the flags), found in the checkout we run from."""
    if Path("bench/run.py").is_file() and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        from bench.run import main as bench_main
    except ImportError:
        raise SDXSError("the bench lives in the repository's bench/ folder: run `mlx-sdxs bench` (or "
                        "`python -m bench.run`) from a checkout of mlx-sdxs, with `pip install -e '.[bench]'`") from None
    return bench_main(bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-sdxs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("txt2img", help="one-step text-to-image")
    add_generation_arguments(p, Path("sdxs.png"))
    p.set_defaults(run=cmd_txt2img)

    p = sub.add_parser("img2img", help="one-step image-to-image (centre crop to a square)")
    p.add_argument("input", type=Path, help="input image (PNG/JPEG/…; grayscale, RGBA and 16-bit are converted)")
    p.add_argument("--strength", type=_ranged(float, 0.02, 1.0, "--strength"), default=None,
                   help="noise strength in [0.02, 1]; unset = the model's one step (SDXS: t=999). "
                        "SDXS degrades below 1: use stabilityai/sd-turbo for strength img2img")
    add_generation_arguments(p, Path("sdxs-img2img.png"))
    p.set_defaults(run=cmd_img2img)

    p = sub.add_parser("camera", help="live camera img2img (3 threads: capture → inference → display)")
    from mlx_sdxs.camera.app import add_camera_arguments

    add_camera_arguments(p)
    p.add_argument("--backend", choices=("mlx", "coreml", "torch"), default="mlx", help="inference backend (default mlx)")
    p.add_argument("--coreml-dir", type=Path, help="CoreML packages from `python -m convert.coreml` (backend coreml)")
    p.add_argument("--compute-units", default="CPU_AND_GPU", choices=("CPU_AND_GPU", "ALL", "CPU_AND_NE", "CPU_ONLY"))
    p.add_argument("--device", default="cpu", help="torch device for --backend torch (cpu, cuda, mps)")
    p.add_argument("--seed", type=int, default=42, help="seed of the fixed noise (seed: 42)")
    add_model_arguments(p)
    p.set_defaults(run=cmd_camera)

    p = sub.add_parser("convert", help="diffusers checkpoint (folder or Hub id) → MLX weights folder")
    p.add_argument("source", help="diffusers checkpoint folder or Hub repo id")
    p.add_argument("--output", "-o", type=Path, default=None, help="destination (default: weights/<name>-<dtype>)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="stored dtype (auto = float32)")
    p.add_argument("--weights-dir", type=Path, default=None)
    p.add_argument("--offline", action="store_true")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("download", help="fetch a Hub model into the Hugging Face cache and convert it once")
    p.add_argument("repo", nargs="?", default=hub.DEFAULT_MODEL)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    p.add_argument("--vae", default=None)
    p.add_argument("--weights-dir", type=Path, default=None)
    p.set_defaults(run=cmd_download)

    sub.add_parser("bench", help="MLX vs PyTorch vs ONNX Runtime vs CoreML side by side (mlx-sdxs bench --help)")

    p = sub.add_parser("info", help="what is converted, their sizes, the MLX device and BLAS")
    p.add_argument("--weights-dir", type=Path, default=None)
    p.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = lambda message, category, *rest: f"mlx-sdxs: warning: {message}\n"
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["bench"]:
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        return args.run(args)
    except SDXSError as exc:
        print(f"mlx-sdxs: error: {exc}", file=sys.stderr)
        return 1
    except MemoryError as exc:
        print(f"mlx-sdxs: error: out of memory during `{args.command}`{f' ({exc})' if str(exc) else ''}; "
              "close other programs, or try a smaller --size/--render-size or --dtype float16", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mlx-sdxs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`mlx-sdxs`: txt2img, img2img, stylize, camera, studio, convert, export, download, info, bench.

Thin by design: parse, build, run, save. Errors users can act on (`SDXSError`) print one line and
exit 1; Ctrl-C (and SIGTERM during a session) exits 130; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from mlx_sdxs import hub, loopback, options, runtime, smoke
from mlx_sdxs.backends.exported import COREML_PRECISIONS, EXPORT_SIDES
from mlx_sdxs.errors import ModelUnavailable, SDXSError
from mlx_sdxs.frames import CONTROL_MODES
from mlx_sdxs.knobs import KNOBS


def add_generation_arguments(parser: argparse.ArgumentParser, default_output: Path) -> None:
    parser.add_argument("--prompt", default=None, help="text prompt (CLIP reads 75 tokens; longer ones are "
                        "truncated with a notice)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the noise (default 0)")
    parser.add_argument("--size", type=options.size_pair("--size", options.SIDES), default=(512, 512),
                        metavar="WxH", help="output size, sides multiples of 64: 512 or 512x384 (default 512)")
    parser.add_argument("--output", "-o", type=Path, default=default_output,
                        help=f"PNG/JPEG/WebP file, written atomically (default {default_output})")
    parser.add_argument("--control-image", type=Path, default=None, metavar="FILE",
                        help="with a ControlNet model (sdxs-512-dreamshaper-sketch): the sketch or edge map to follow")
    parser.add_argument("--control-mode", choices=CONTROL_MODES, default="sketch",
                        help="what --control-image is: a sketch, dark on light (default; inverted as the SDXS sketch "
                             "demo does), lines, light on dark (as they are), or a photo to take the edges of")
    options.add_knob_argument(parser, KNOBS["control_strength"], live=False)
    options.add_model_arguments(parser)


def _choice(args: argparse.Namespace):
    from mlx_sdxs.backends import BackendChoice

    return BackendChoice.from_args(args)


def _generated(pipeline, args: argparse.Namespace, seconds: float) -> None:
    width, height = args.size
    print(f"mlx-sdxs: {width}x{height} in {seconds:.2f} s ({pipeline.describe()}) → {args.output}", file=sys.stderr)


def _control(args: argparse.Namespace) -> dict:
    """The control image flags as `txt2img`/`img2img` arguments (read and converted before the model loads)."""
    if args.control_image is None:
        return {}
    from mlx_sdxs.frames import control_image
    from mlx_sdxs.imageio import read_image

    return {"control_image": control_image(read_image(args.control_image), args.control_mode),
            "control_strength": args.control_strength}


def add_job_arguments(parser: argparse.ArgumentParser, unit: str) -> None:
    """The flags of a bulk run: where it writes, and where it runs."""
    group = parser.add_argument_group("bulk runs")
    group.add_argument("--out-dir", type=Path, default=None, metavar="DIR",
                       help=f"write every {unit} here with a manifest (manifest.jsonl); a rerun skips what is done")
    group.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run on a Ray cluster (the ray extra): one worker per GPU (else per node) holding the "
                            "model; ADDRESS as `ray start` printed it, or 'auto'; none = a local Ray instance")
    group.add_argument("--ray-workers", type=options.number(int, 1, 4096, "--ray-workers"), default=None,
                       metavar="N", help="with --ray: this many workers instead of one per GPU/node")


def add_image_job_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser, "image")
    from mlx_sdxs.jobs.plan import seed_list

    group = parser.add_argument_group("bulk images")
    group.add_argument("--prompts-file", "--prompts", dest="prompts_file", type=Path, default=None, metavar="FILE",
                       help="UTF-8, one prompt per line ('#' comments): every prompt × seed into --out-dir")
    group.add_argument("--seeds", type=seed_list, default=None, metavar="0-3|0,5,9",
                       help="several random seeds (ranges inclusive): every prompt × seed into --out-dir")
    group.add_argument("--batch-size", type=options.number(int, 1, 256, "--batch-size"), default=None, metavar="N",
                       help="images per model call in a bulk run (default: the pipeline's)")


def _bulk(args: argparse.Namespace) -> bool:
    """Whether the flags ask for a bulk run (then --out-dir is needed)."""
    asked = [flag for flag, value in (("--prompts-file", args.prompts_file), ("--seeds", args.seeds),
                                      ("--ray", args.ray), ("--batch-size", args.batch_size)) if value]
    if getattr(args, "input", None) is not None and (len(args.input) > 1 or args.input[0].is_dir()):
        asked.append("several inputs")
    if asked and args.out_dir is None:
        raise SDXSError(f"{', '.join(asked)}: a bulk run writes into a folder; add --out-dir DIR")
    return args.out_dir is not None


def _pool(args: argparse.Namespace):
    """The bulk run's workers: Ray actors with --ray, else this process."""
    if args.ray is not None:
        from mlx_sdxs.jobs.cluster import RayPool

        return RayPool(_choice(args), args.ray, args.ray_workers)
    from mlx_sdxs.jobs.run import LocalPool
    from mlx_sdxs.jobs.work import Worker

    return LocalPool(Worker(_choice(args)), getattr(args, "streams", 1))


def cmd_bulk_images(args: argparse.Namespace, kind: str) -> int:
    from mlx_sdxs.camera.prompts import load_prompts
    from mlx_sdxs.jobs import plan
    from mlx_sdxs.jobs.run import run_images
    from mlx_sdxs.pipeline import DEFAULT_BATCH_SIZE

    if args.prompt is not None and args.prompts_file is not None:
        raise SDXSError("--prompt and --prompts-file: give one")
    prompts = load_prompts(args.prompts_file) if args.prompts_file is not None else [args.prompt]
    seeds = args.seeds or (args.seed,)
    if kind == "txt2img":
        tasks = plan.txt2img_tasks(prompts, seeds)
    else:
        tasks = plan.img2img_tasks(plan.image_inputs(args.input), prompts, seeds)
    control = _control(args)
    job = plan.ImageJob(kind, args.model or hub.DEFAULT_MODEL, args.size, tasks, args.batch_size or DEFAULT_BATCH_SIZE,
                        getattr(args, "strength", None), control.get("control_image"),
                        str(args.control_image.resolve()) if control else None, control.get("control_strength"))
    run_images(job, args.out_dir, lambda: _pool(args))
    return 0


def _prompt_needed(args: argparse.Namespace) -> None:
    if args.prompt is None:
        raise SDXSError(f"{args.command} needs --prompt TEXT (or --prompts-file FILE with --out-dir)")


def cmd_txt2img(args: argparse.Namespace) -> int:
    from mlx_sdxs.backends import load_pipeline
    from mlx_sdxs.camera.presenter import labelled
    from mlx_sdxs.imageio import write_image

    if _bulk(args):
        return cmd_bulk_images(args, "txt2img")
    _prompt_needed(args)
    control = _control(args)
    pipeline = load_pipeline(_choice(args))
    start = time.perf_counter()
    image = pipeline.txt2img(args.prompt, seed=args.seed, size=args.size, **control)
    _generated(pipeline, args, time.perf_counter() - start)
    write_image(args.output, labelled(image, pipeline.label))
    return 0


def cmd_img2img(args: argparse.Namespace) -> int:
    from mlx_sdxs.backends import load_pipeline
    from mlx_sdxs.camera.presenter import labelled
    from mlx_sdxs.imageio import read_image, write_image

    if _bulk(args):
        return cmd_bulk_images(args, "img2img")
    _prompt_needed(args)
    image = read_image(args.input[0])
    control = _control(args)
    pipeline = load_pipeline(_choice(args))
    start = time.perf_counter()
    result = pipeline.img2img(image, args.prompt, strength=args.strength, seed=args.seed, size=args.size, **control)
    _generated(pipeline, args, time.perf_counter() - start)
    write_image(args.output, labelled(result, pipeline.label))
    return 0


def _render_side(text: str) -> int:
    width, height = options.size_pair("--render-side", options.SIDES)(text)
    if width != height:
        raise argparse.ArgumentTypeError(f"--render-side is one number (the longer side), got {text!r}")
    return width


def add_stylize_arguments(parser: argparse.ArgumentParser) -> None:
    from mlx_sdxs.knobs import RECIPE_KNOBS
    from mlx_sdxs.recipe import RecipeSettings

    parser.add_argument("videos", type=Path, nargs="+", metavar="VIDEO", help="video files (any format FFmpeg reads)")
    add_job_arguments(parser, "video")
    parser.add_argument("--streams", type=options.number(int, 1, 64, "--streams"), default=4, metavar="N",
                        help="videos stylised at once, their frames run as one batch (default 4; with --ray: one "
                             "video per worker)")
    style = parser.add_argument_group("style (the camera recipe's knobs, fixed for the whole video)")
    style.add_argument("--seed", type=int, default=RecipeSettings.seed,
                       help=f"random seed of the fixed noise (default {RecipeSettings.seed}, as the demo)")
    style.add_argument("--seed-b", type=int, default=None,
                       help="a second random seed: the noise sits on the slerp between the two (--seed-blend)")
    style.add_argument("--prompt", required=True, help="the style of every frame")
    for name in RECIPE_KNOBS:
        if name != "prompt":  # (its help is the live session's)
            options.add_knob_argument(style, KNOBS[name], live=False)
    style.add_argument("--strength", type=options.number(float, 0.02, 1.0, "--strength"), default=None,
                       help="img2img strength for strength-based models (SD-Turbo); unset = the model's one step")
    style.add_argument("--render-side", type=_render_side, default=None, metavar="N",
                       help="the render size's longer side (a multiple of 64); the other follows the video's aspect. "
                            "Default: 512 on a GPU, 256 on a CPU. Output frames are resized back to the video's size")
    options.add_model_arguments(parser)


def cmd_stylize(args: argparse.Namespace) -> int:
    from mlx_sdxs.camera.session import default_render_size
    from mlx_sdxs.jobs import plan
    from mlx_sdxs.jobs.run import run_videos
    from mlx_sdxs.jobs.video import require_av

    require_av()
    if args.out_dir is None:
        raise SDXSError("stylize writes into a folder: add --out-dir DIR")
    job = plan.VideoJob(args.model or hub.DEFAULT_MODEL, plan.video_tasks(args.videos), args.prompt,
                        args.render_side or default_render_size(args)[0], args.prompt_b, args.prompt_blend,
                        args.seed, args.seed_b, args.seed_blend, args.feedback, args.strength,
                        args.control or "edges", args.control_strength)
    run_videos(job, args.out_dir, lambda: _pool(args))
    return 0


def open_stream_backend(args: argparse.Namespace):
    """The camera/studio inference stage from the flags (`--backend`, the model flags, the recipe flags). The
    session requests the first prompt itself, like any later one."""
    from mlx_sdxs.backends import open_backend
    from mlx_sdxs.recipe import RecipeSettings

    settings = RecipeSettings(render_size=args.render_size, feedback=args.feedback, seed=args.seed,
                              strength=args.strength, seed_b=args.seed_b,
                              seed_blend=args.seed_blend,
                              control=args.control, control_strength=args.control_strength)
    recipe = open_backend(_choice(args), settings)
    streams = args.max_streams + 1 if args.command == "studio" else len(args.sources)
    if streams <= 1:
        return recipe
    from mlx_sdxs.backends.batcher import StreamBatcher

    # The studio's visitors, or the camera's several sources, each a stream of the host's batch on the device.
    batcher = StreamBatcher(recipe, streams=streams)
    batcher.start()
    return batcher.host


def _osc(args: argparse.Namespace) -> list:
    """The OSC control surface's hook, when --osc-port asks for one."""
    if args.osc_port is None:
        return []
    from mlx_sdxs.osc import osc_hook

    return [osc_hook(args.osc_host, args.osc_port)]


def cmd_camera(args: argparse.Namespace) -> int:
    from mlx_sdxs.camera.app import run_camera

    attach = _osc(args)
    if args.preview_port is not None:
        from mlx_sdxs.studio import server_hook

        attach.insert(0, server_hook(args, studio=False))
    return run_camera(args, open_stream_backend, attach=attach)


def cmd_studio(args: argparse.Namespace) -> int:
    from mlx_sdxs.camera.app import run_camera
    from mlx_sdxs.studio import server_hook

    if args.max_streams is None:
        args.max_streams = options.DEFAULT_MAX_STREAMS["gpu" if runtime.on_gpu() else "cpu"]
    return run_camera(args, open_stream_backend, studio=True, attach=[server_hook(args, studio=True), *_osc(args)])


def cmd_convert(args: argparse.Namespace) -> int:
    from mlx_sdxs.convert import convert_checkpoint

    dtype = runtime.dtype_name(runtime.parse_dtype(args.dtype))
    source = hub.checkpoint_folder(args.source, args.offline or None)
    dst = args.output or (args.weights_dir or hub.default_weights_root()) / f"{hub.model_slug(source)}-{dtype}"
    start = time.perf_counter()
    convert_checkpoint(source, dst, dtype=dtype)
    print(f"mlx-sdxs: converted {source} → {dst} ({dtype}) in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "coreml":
        from mlx_sdxs.backends.export.coreml import export_coreml

        out = export_coreml(args.checkpoint, args.out, args.render_size, args.precision, args.minimum_deployment_target,
                            args.controlnet)
    else:
        from mlx_sdxs.backends.export.onnx import export_onnx

        out = export_onnx(args.checkpoint, args.out, args.render_size, args.controlnet)
    print(f"mlx-sdxs: exported {args.checkpoint} → {out} ({args.format}, {args.render_size[0]}x{args.render_size[1]})")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    dtype = runtime.dtype_name(runtime.parse_dtype(args.dtype))
    folder = hub.resolve(args.repo, dtype, args.vae, args.weights_dir, offline=None)
    family = hub.family_model(args.repo)
    extra = ""
    if family is not None and family.lora is not None:
        extra = f" (its LoRA {family.lora} at {hub.lora_path(family.lora)}, merged when it loads)"
    print(f"mlx-sdxs: {args.repo} ready at {folder}{extra}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import platform
    import shutil

    import mlx.core as mx

    from mlx_sdxs import __version__, _blas, native

    described = runtime.describe()
    print(f"mlx-sdxs {__version__} · MLX {mx.__version__} · Python {platform.python_version()} · {platform.platform()}")
    print(f"device: {described['device']}  (default dtype {described['dtype']})")
    print(f"kernels: {described['kernels']} (policy {described['kernels_requested']}; "
          f"set {runtime.KERNELS_ENV} or --kernels to {', '.join(runtime.KERNEL_POLICIES)})")
    if not runtime.on_gpu():
        print(f"BLAS:   {_blas.status()}")
        # mx.compile builds its fused CPU kernels with the system g++ (SiLU, GroupNorm+SiLU, softmax).
        compiler = shutil.which("g++")
        print("fused CPU kernels: " + (f"compiled with {compiler}" if compiler else
                                       "uncompiled (no g++ on PATH; installing it makes SiLU/attention ~2x faster)"))
        print(f"native CPU kernels: {native.status()}")
    root = args.weights_dir or hub.default_weights_root()
    models = hub.cached_models(root)
    print(f"converted models in {root}: " + ("none" if not models else ""))
    for name, dtype, size in models:
        print(f"  {name:50s} {dtype:9s} {size / 2**30:6.2f} GiB")
    return 0


def cmd_bench(bench_args: list[str]) -> int:
    """`python -m bench.run` with these flags (its own parser owns them), in the checkout we run from: the bench
    is part of the repository, not of the package, so it is run, never imported."""
    if not Path("bench/run.py").is_file():
        raise SDXSError("the bench lives in the repository's bench/ folder: run `mlx-sdxs bench` (or "
                        "`python -m bench.run`) from a checkout of mlx-sdxs, with `pip install -e '.[bench]'`")
    return subprocess.run([sys.executable, "-m", "bench.run", *bench_args]).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-sdxs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("txt2img", help="one-step text-to-image")
    add_generation_arguments(p, Path("sdxs.png"))
    add_image_job_arguments(p)
    p.set_defaults(run=cmd_txt2img)

    p = sub.add_parser("img2img", help="one-step image-to-image (centre crop to the output's aspect)")
    p.add_argument("input", type=Path, nargs="+", help="input image (PNG/JPEG/…; grayscale, RGBA and 16-bit are "
                   "converted); several images or folders of them with --out-dir")
    p.add_argument("--strength", type=options.number(float, 0.02, 1.0, "--strength"), default=None,
                   help="noise strength in [0.02, 1]; unset = the model's one step (SDXS: t=999). "
                        "SDXS degrades below 1: use stabilityai/sd-turbo for strength img2img")
    add_generation_arguments(p, Path("sdxs-img2img.png"))
    add_image_job_arguments(p)
    p.set_defaults(run=cmd_img2img)

    p = sub.add_parser("stylize", help="whole videos, every frame through the camera recipe, sound kept")
    add_stylize_arguments(p)
    p.set_defaults(run=cmd_stylize)

    p = sub.add_parser("camera", help="live camera img2img (3 threads: capture → inference → display)")
    options.add_stream_arguments(p)
    p.add_argument("--no-window", "--headless", dest="window", action="store_false",
                   help="no OpenCV window (a status line instead; stop with Ctrl-C, --max-frames or --duration)")
    p.add_argument("--preview-port", type=options.number(int, 0, 65535, "--preview-port"), default=None,
                   help=f"also serve the studio page on http://{loopback.HOST}:PORT/ (0 = any free port; studio extra)")
    p.set_defaults(run=cmd_camera)

    p = sub.add_parser("studio", help="the live demo in a browser, with the visitor's own webcam (studio extra)")
    options.add_stream_arguments(p)
    options.add_server_arguments(p)
    p.set_defaults(run=cmd_studio)

    p = sub.add_parser("convert", help="diffusers checkpoint (folder or Hub id) → MLX weights folder")
    p.add_argument("source", help="diffusers checkpoint folder or Hub repo id")
    p.add_argument("--output", "-o", type=Path, default=None, help="destination (default: weights/<model>-<dtype>)")
    p.add_argument("--dtype", choices=options.DTYPE_CHOICES, default="auto",
                   help="stored dtype (auto = what this machine computes in: float16 on a GPU, float32 on the CPU)")
    p.add_argument("--weights-dir", type=Path, default=None)
    p.add_argument("--offline", action="store_true")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("export", help="diffusers checkpoint → CoreML packages or ONNX graphs (comparison backends)")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, what in (("coreml", "CoreML ML Programs (the SDXS camera demo's backend; predicts on macOS)"),
                       ("onnx", "ONNX graphs for ONNX Runtime")):
        e = formats.add_parser(name, help=what, description=f"Export a diffusers checkpoint's UNet and VAE as {what}.")
        e.add_argument("checkpoint", type=Path, help="diffusers checkpoint folder (model_index.json, unet/, vae/, …)")
        e.add_argument("out", type=Path, help="output folder (replaced if it exists)")
        e.add_argument("--render-size", type=options.size_pair("--render-size", EXPORT_SIDES), default=(512, 512),
                       metavar="WxH", help="static render size of the graphs (default 512)")
        e.add_argument("--controlnet", type=Path, default=None, metavar="DIR",
                       help="a diffusers ControlNet folder to export inside the UNet graph (default: the checkpoint's "
                            "controlnet/, if it has one)")
        if name == "coreml":
            e.add_argument("--precision", choices=COREML_PRECISIONS, default="float16", help="compute precision")
            e.add_argument("--minimum-deployment-target", choices=("macOS13", "macOS14", "macOS15"), default="macOS14")
        e.set_defaults(run=cmd_export)

    p = sub.add_parser("download", help="fetch a model (with its ControlNet or LoRA) into the Hugging Face cache and "
                                        "convert it once")
    p.add_argument("repo", nargs="?", default=hub.DEFAULT_MODEL,
                   help=f"a family name or Hub repo id ({', '.join(hub.KNOWN_MODELS)})")
    p.add_argument("--dtype", choices=options.DTYPE_CHOICES, default="auto",
                   help="stored dtype (auto = what this machine computes in)")
    p.add_argument("--vae", default=None)
    p.add_argument("--weights-dir", type=Path, default=None)
    p.set_defaults(run=cmd_download)

    sub.add_parser("bench", help="MLX vs PyTorch vs ONNX Runtime vs CoreML side by side (mlx-sdxs bench --help)")

    p = sub.add_parser("info", help="device, dtype, kernel policy, BLAS, converted models and their dtypes")
    p.add_argument("--weights-dir", type=Path, default=None)
    options.add_kernel_argument(p)
    p.set_defaults(run=cmd_info)
    return parser


def leave_if_stuck(status: int) -> None:
    """After a camera session, a loop thread may still be inside a model call in native code (a frame longer
    than its join limit). Interpreter shutdown would then end that thread mid-call and abort the process
    ("terminate called without an active exception"); with every output already closed, leave now instead."""
    from mlx_sdxs.camera.loop import stuck_workers

    stuck = stuck_workers()
    if stuck:
        print(f"mlx-sdxs: leaving without waiting for {', '.join(stuck)} (a model call still running); "
              "every output was closed", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = lambda message, category, *rest: f"mlx-sdxs: warning: {message}\n"
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "mlx-sdxs"
    try:
        if argv[:1] == ["bench"]:
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        smoke.shrink(args)
        runtime.select_kernels(getattr(args, "kernels", None))
        return args.run(args)
    except SDXSError as exc:
        hint = " (here: --model PATH, or --model random)" if isinstance(exc, ModelUnavailable) else ""
        print(f"mlx-sdxs: error: {exc}{hint}", file=sys.stderr)
        return 1
    except MemoryError as exc:
        print(f"mlx-sdxs: error: out of memory during `{command}`{f' ({exc})' if str(exc) else ''}; "
              "close other programs, or try a smaller --size/--render-size or --dtype float16", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mlx-sdxs: interrupted", file=sys.stderr)
        return 130
    finally:
        runtime.select_kernels(None)


def entry_point() -> None:
    """The `mlx-sdxs` command: `main`, then leave at once if a model call outlived its session."""
    status = main()
    leave_if_stuck(status)
    sys.exit(status)


if __name__ == "__main__":
    entry_point()

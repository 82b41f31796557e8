"""Command-line flags shared by the commands: argparse types that name their flag and range, and the
flag groups `txt2img`, `img2img`, `camera`, `studio`, `convert` and the bench have in common."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from mlx_sdxs import hub, runtime
from mlx_sdxs.backends import COMPUTE_UNITS, NAMES
from mlx_sdxs.frames import CONTROL_MODES, MIN_SIDE
from mlx_sdxs.recipe import DEFAULT_CONTROL_STRENGTH, MAX_CONTROL_STRENGTH

#: Each side of a camera render size: a multiple of 64 in this range.
RENDER_SIDES = (128, 1024)
GENERATION_SIDES = (64, 2048)
DTYPE_CHOICES = ("auto", *runtime.DTYPES)
#: Largest grey-level change of a 32×32-thumbnail cell below which a frame is not re-processed: above a
#: webcam's sensor noise averaged over a cell (~1 level), below any visible motion.
DEFAULT_SIMILARITY = 3.0


def number(kind: type, low: float, high: float | None, flag: str) -> Callable[[str], float]:
    """argparse type: a number in [low, high] (high None = unbounded), the flag and range named in the error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a{'n integer' if kind is int else ' number'}, "
                                             f"got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{flag} must be in {bounds}, got {value}")
        return value

    return parse


def size_pair(flag: str, sides: tuple[int, int], multiple: int = 64) -> Callable[[str], tuple[int, int]]:
    """argparse type for WxH (or one number for a square): each side a multiple of `multiple` in `sides`."""
    low, high = sides

    def parse(text: str) -> tuple[int, int]:
        parts = text.lower().split("x")
        if len(parts) not in (1, 2):
            raise argparse.ArgumentTypeError(f"{flag} must look like 512 or 512x384, got {text!r}")
        values = tuple(number(int, low, high, flag)(part) for part in parts)
        for value in values:
            if value % multiple:
                raise argparse.ArgumentTypeError(f"{flag} sides must be multiples of {multiple} in [{low}, {high}] "
                                                 f"(e.g. 256, 512, 512x384, 640x384), got {text}")
        return (values[0], values[0]) if len(values) == 1 else values

    return parse


def capture_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        size = int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--capture-size must look like 640x480, got {text!r}") from None
    if min(size) < MIN_SIDE or max(size) > 8192:
        raise argparse.ArgumentTypeError(f"--capture-size sides must be in [{MIN_SIDE}, 8192], got {text}")
    return size




def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None,
                       help=f"an SDXS-512 family name or Hub repo id ({', '.join(hub.KNOWN_MODELS)}), a local diffusers "
                            "checkpoint, a converted weights folder, or 'random'/'random-tiny' (random weights, "
                            f"offline). Default: {hub.DEFAULT_MODEL}")
    group.add_argument("--vae", default=None, help="replace the checkpoint's VAE: 'large' (the checkpoint's own KL "
                                                   "VAE, vae_large/), or a folder or repo, e.g. madebyollin/taesd")
    group.add_argument("--lora", action="append", default=[], metavar="FILE_OR_REPO[:SCALE]",
                       help="merge a LoRA when the model loads (repeatable; MLX backend): a PEFT adapter folder, a "
                            "kohya/A1111 .safetensors file, or a Hub repo with one; SCALE default 1")
    group.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                       help="weights/compute dtype; auto = float32 on the CPU, float16 on a GPU")
    add_kernel_argument(group)
    group.add_argument("--weights-dir", type=Path, default=None,
                       help="where converted weights live (default: $MLX_SDXS_WEIGHTS or ./weights)")
    group.add_argument("--offline", action="store_true", help="never contact the Hub; use the cache and local folders only")


def add_kernel_argument(parser) -> None:
    parser.add_argument("--kernels", choices=runtime.KERNEL_POLICIES, default=None,
                        help=f"kernel policy (default ${runtime.KERNELS_ENV} or auto): portable = MLX built-ins, as "
                             "on Metal; cuda = custom CUDA kernels (NVIDIA GPUs); cpu = the CPU rewrites; "
                             "auto = cuda on a CUDA GPU, cpu for float32 on the CPU, else portable")


def add_control_strength_argument(parser) -> None:
    parser.add_argument("--control-strength", type=number(float, 0.0, MAX_CONTROL_STRENGTH, "--control-strength"),
                        default=DEFAULT_CONTROL_STRENGTH,
                        help=f"how strongly a ControlNet's image steers (default {DEFAULT_CONTROL_STRENGTH}; keys c/v)")


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """The camera/studio session: source, style, blends, outputs, backend."""
    source = parser.add_argument_group("source")
    source.add_argument("--source", "--camera", dest="source", default=None,
                        help="camera index (0, 1, …), a video file, 'synthetic' (built-in moving scene), "
                             "'synthetic:IMAGE' (pan/zoom over an image) or, in the studio, 'draw' (its drawing canvas). "
                             "Default: camera 0, else synthetic (the studio: the page's webcam)")
    source.add_argument("--capture-size", type=capture_size, default=(640, 480), metavar="WxH",
                        help="requested camera / synthetic frame size (default 640x480)")
    source.add_argument("--fps", type=number(float, 0.0, 240.0, "--fps"), default=None,
                        help="camera/synthetic rate (default 30); for a video, overrides its own rate (0 = unpaced)")
    source.add_argument("--no-loop", dest="loop", action="store_false", help="stop at the end of a video file")

    style = parser.add_argument_group("style")
    style.add_argument("--prompt", default=None, help="initial prompt (default: the first of the gallery / --prompts)")
    style.add_argument("--prompts", type=Path, default=None, help="UTF-8 file, one prompt per line, cycled with n/p")
    style.add_argument("--prompt-b", default=None,
                       help="a second prompt: the conditioning sits on the slerp between the two (keys [ ])")
    style.add_argument("--prompt-blend", type=number(float, 0.0, 1.0, "--prompt-blend"), default=0.5,
                       help="position between --prompt (0) and --prompt-b (1) (default 0.5)")
    style.add_argument("--seed", type=int, default=42, help="random seed of the fixed noise (default 42, as the demo)")
    style.add_argument("--seed-b", type=int, default=None,
                       help="a second random seed: the noise sits on the slerp between the two (keys , .)")
    style.add_argument("--seed-blend", type=number(float, 0.0, 1.0, "--seed-blend"), default=0.5,
                       help="position between --seed (0) and --seed-b (1) (default 0.5)")
    style.add_argument("--blend", type=number(float, 0.0, 1.0, "--blend"), default=0.0,
                       help="camera blend: shown = (1-blend)*AI + blend*camera (keys +/-; default 0)")
    style.add_argument("--ema", type=number(float, 0.0, 0.99, "--ema"), default=0.4,
                       help="EMA smoothing of the AI image per display tick: shown = ema*shown + (1-ema)*newest "
                            "(keys e/d; default 0.4)")
    style.add_argument("--feedback", type=number(float, 0.0, 1.0, "--feedback"), default=0.1,
                       help="latent feedback of the previous frame (default 0.1, as the demo)")
    style.add_argument("--control", choices=CONTROL_MODES, default=None,
                       help="with a ControlNet (sdxs-512-dreamshaper-sketch): how each frame becomes its control image "
                            "— edges of the frame, a sketch (dark on light, inverted) or lines (light on dark, as they "
                            "are). Default: sketch for the studio's draw source, else edges")
    add_control_strength_argument(style)
    style.add_argument("--strength", type=number(float, 0.02, 1.0, "--strength"), default=None,
                       help="img2img strength for strength-based models (SD-Turbo); unset = the model's one step")
    style.add_argument("--render-size", type=size_pair("--render-size", RENDER_SIDES), default=None, metavar="WxH",
                       help=f"model resolution, sides multiples of 64 in {list(RENDER_SIDES)}: 512, 512x384, 640x384 "
                            "… (default: 512 on a GPU, 256 on a CPU)")
    style.add_argument("--output-size", type=number(int, 64, 2048, "--output-size"), default=512,
                       help="height of each half of the displayed frame (default 512)")
    style.add_argument("--similarity-threshold", type=number(float, 0.0, 255.0, "--similarity-threshold"),
                       default=DEFAULT_SIMILARITY,
                       help="skip inference when no cell of a 32x32 grey thumbnail changed by this many grey "
                            f"levels since the last processed frame; 0 = off (default {DEFAULT_SIMILARITY})")

    output = parser.add_argument_group("output")
    output.add_argument("--record", type=Path, default=None, metavar="PATH.mp4",
                        help="record the AI view (H.264 with the studio extra, else mp4v), in real time")
    output.add_argument("--record-view", choices=("ai", "display"), default="ai",
                        help="what --record keeps: the AI image (default) or the whole window")
    output.add_argument("--record-every-frame", action="store_true",
                        help="record exactly one video frame per display tick instead of real time")
    output.add_argument("--frames-dir", type=Path, default=None, help="write every displayed frame as a PNG here")
    output.add_argument("--save-dir", type=Path, default=Path("captures"),
                        help="where the s key (and the studio's snapshots) save (default captures/)")
    output.add_argument("--max-frames", type=number(int, 1, None, "--max-frames"), default=None,
                        help="stop after this many displayed frames")
    output.add_argument("--duration", type=number(float, 0.0, None, "--duration"), default=None,
                        help="stop after this many seconds (after warm-up)")

    backend = parser.add_argument_group("backend")
    backend.add_argument("--backend", choices=NAMES, default=NAMES[0], help=f"inference backend (default {NAMES[0]})")
    backend.add_argument("--export-dir", "--coreml-dir", dest="export_dir", type=Path, default=None,
                         help="a CoreML/ONNX export folder (default: exported once from the model, under weights/)")
    backend.add_argument("--compute-units", default=COMPUTE_UNITS[0], choices=COMPUTE_UNITS, help="CoreML compute units")
    backend.add_argument("--device", default=None, help="torch device for --backend torch (cpu, cuda, mps); "
                                                        "ONNX provider for --backend onnx (cpu, cuda). Default cpu")
    add_model_arguments(parser)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; anything else is reachable "
                            "from the network, token or not)")
    group.add_argument("--port", type=number(int, 0, 65535, "--port"), default=8765,
                       help="port (default 8765; 0 = any free port)")
    group.add_argument("--open", action="store_true", help="open the page in the default browser")

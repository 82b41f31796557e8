"""Command-line flags shared by the commands: argparse types that name their flag and range, and the
flag groups `txt2img`, `img2img`, `camera`, `studio`, `convert` and the bench have in common."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from mlx_sdxs import hub, loopback, presets, runtime
from mlx_sdxs.backends import COMPUTE_UNITS, NAMES
from mlx_sdxs.camera.outputs import AI_VIEW, DISPLAY_VIEW, SAVE_DIR
from mlx_sdxs.camera.sources import DEFAULT_FPS, DEFAULT_SIZE
from mlx_sdxs.frames import MIN_SIDE
from mlx_sdxs.knobs import KNOBS, Knob
from mlx_sdxs.studio.visitors import MOST_STREAMS
from mlx_sdxs.loopback import HOST
from mlx_sdxs.recipe import RecipeSettings

#: Each side of a generated image or a camera render size: a multiple of 64 in this range.
SIDES = (64, 2048)
DTYPE_CHOICES = ("auto", *runtime.DTYPES)
#: The studio's streams by default: as many as keep each at the camera's rate on the device kind. A CPU keeps none
#: there (bench/results/streams-*: one stream at 256² is ~2 AI FPS); on a GPU a 512² frame took 7.7 ms alone on an
#: H200 (unmeasured batched: set --max-streams from `python -m bench.streams` on the GPU).
DEFAULT_MAX_STREAMS = {"cpu": 1, "gpu": 4}
#: Where a knob's flag has no default of its own, what `--help` says instead.
UNSET_DEFAULTS = {"prompt": "the first of the gallery or --prompts", "prompt_b": "none",
                  "control": "sketch for the studio's draw source, else edges"}


def number(kind: type, low: float, high: float | None, flag: str) -> Callable[[str], float]:
    """argparse type: a number in [low, high] (high None = unbounded), the flag and range named in the error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a{'n integer' if kind is int else ' number'}, "
                                             f"got {text!r}") from None
        if not value >= low or (high is not None and not value <= high):  # NaN is in no range
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
                            "checkpoint, a converted weights folder, or random weights in a model's shape, offline "
                            f"({', '.join(presets.RANDOM_MODELS)}; a known model that cannot be had offline falls "
                            f"back to its own, with a warning). Default: {hub.DEFAULT_MODEL}")
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


class SourceAction(argparse.Action):
    """`--source`, repeatable: every value in `sources`, the first (the session's own stream) in `source`."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.sources = [*namespace.sources, value]
        namespace.source = namespace.sources[0]


def add_knob_argument(parser, knob: Knob, live: bool = True) -> None:
    """The flag of a knob from the knob table: its range checked by argparse (so a bad value stops before
    anything loads), and range, default and keys in `--help` (`live`: the session's keys, which a one-off
    generation has not)."""
    facts = [f"{knob.low:g}–{knob.high:g}"] if knob.kind == "number" else []
    facts.append(f"default {UNSET_DEFAULTS[knob.name] if knob.default is None else format(knob.default, 'g')}")
    if live and knob.keys:
        facts.append(f"keys {knob.keys[0]} {knob.keys[1]}")
    kwargs = {"type": number(float, knob.low, knob.high, knob.flag)} if knob.kind == "number" else {}
    if knob.kind == "choice":
        kwargs["choices"] = knob.choices
    parser.add_argument(knob.flag, default=knob.default, help=f"{knob.help} ({'; '.join(facts)})", **kwargs)


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    """The camera/studio session: source, style, blends, outputs, backend."""
    source = parser.add_argument_group("source")
    source.add_argument("--source", "--camera", dest="source", action=SourceAction, default=None,
                        help="camera index (0, 1, …), a video file, 'synthetic' (built-in moving scene), "
                             "'synthetic:IMAGE' (pan/zoom over an image) or, in the studio, 'draw' (its drawing canvas). "
                             "Repeat it for several streams in one batch (camera: tiled in the window, one recording "
                             "each). Default: camera 0, else synthetic (the studio: the page's webcam)")
    parser.set_defaults(sources=[])
    source.add_argument("--capture-size", type=capture_size, default=DEFAULT_SIZE, metavar="WxH",
                        help="requested camera / synthetic frame size (default {}x{})".format(*DEFAULT_SIZE))
    source.add_argument("--fps", type=number(float, 0.0, 240.0, "--fps"), default=None,
                        help=f"camera/synthetic rate (default {DEFAULT_FPS:g}); for a video, overrides its own rate "
                             "(0 = unpaced)")
    source.add_argument("--no-loop", dest="loop", action="store_false", help="stop at the end of a video file")

    style = parser.add_argument_group("style")
    style.add_argument("--prompts", type=Path, default=None, help="UTF-8 file, one prompt per line, cycled with n/p")
    style.add_argument("--seed", type=int, default=RecipeSettings.seed,
                       help=f"random seed of the fixed noise (default {RecipeSettings.seed}, as the demo)")
    style.add_argument("--seed-b", type=int, default=None,
                       help="a second random seed: the noise sits on the slerp between the two (--seed-blend)")
    for knob in KNOBS.values():
        add_knob_argument(style, knob)
    style.add_argument("--strength", type=number(float, 0.02, 1.0, "--strength"), default=None,
                       help="img2img strength for strength-based models (SD-Turbo); unset = the model's one step")
    style.add_argument("--render-size", type=size_pair("--render-size", SIDES), default=None, metavar="WxH",
                       help=f"model resolution, sides multiples of 64 in {list(SIDES)}: 512, 512x384, 640x384 "
                            "… (default: 512 on a GPU, 256 on a CPU)")
    style.add_argument("--output-size", type=number(int, 64, 2048, "--output-size"), default=512,
                       help="height of each half of the displayed frame (default 512)")

    output = parser.add_argument_group("output")
    output.add_argument("--record", type=Path, default=None, metavar="PATH.mp4",
                        help="record the AI view (H.264 with the studio extra, else mp4v), in real time")
    output.add_argument("--record-view", choices=(AI_VIEW, DISPLAY_VIEW), default=AI_VIEW,
                        help="what --record keeps: the AI image (default) or the whole window")
    output.add_argument("--record-every-frame", action="store_true",
                        help="record exactly one video frame per display tick instead of real time")
    output.add_argument("--frames-dir", type=Path, default=None, help="write every displayed frame as a PNG here")
    output.add_argument("--save-dir", type=Path, default=SAVE_DIR,
                        help=f"where the s key (and the studio's snapshots) save (default {SAVE_DIR}/)")
    output.add_argument("--max-frames", type=number(int, 1, None, "--max-frames"), default=None,
                        help="stop after this many displayed frames")
    output.add_argument("--duration", type=number(float, 0.0, None, "--duration"), default=None,
                        help="stop after this many seconds (after warm-up)")

    osc = parser.add_argument_group("OSC control (osc extra)")
    osc.add_argument("--osc-port", type=number(int, 0, 65535, "--osc-port"), default=None,
                     help="take /sdxs/<knob> value messages (e.g. /sdxs/prompt \"a fox\", /sdxs/ema 0.5) on this UDP "
                          "port; /sdxs/status replies with the live state (0 = any free port)")
    osc.add_argument("--osc-host", default=loopback.HOST,
                     help=f"address the OSC port listens on (default {loopback.HOST}: this machine only; anything "
                          "else lets every device that reaches it steer the session, with no token)")

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
    group.add_argument("--host", default=HOST,
                       help=f"address to listen on (default {HOST}: this machine only; 0.0.0.0 or :: = every address "
                            "of this machine, for phones and laptops on the network: HTTPS, a QR code to join)")
    group.add_argument("--port", type=number(int, 0, 65535, "--port"), default=8765,
                       help="port (default 8765; 0 = any free port)")
    group.add_argument("--open", action="store_true", help="open the page (with the host's controls) in the browser")
    group.add_argument("--max-streams", type=number(int, 1, MOST_STREAMS, "--max-streams"), default=None,
                       help="visitors with a stream of their own at once, batched on the device; past it a visitor "
                            "waits in line or watches the host's stream (default: "
                            f"{DEFAULT_MAX_STREAMS['cpu']} on a CPU, {DEFAULT_MAX_STREAMS['gpu']} on a GPU — set it "
                            "from `python -m bench.streams` on yours)")
    group.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None,
                       help="serve HTTPS (default: when --host is not this machine only, as browsers give the webcam "
                            "only to https pages or localhost; without --tls-cert, a self-signed certificate made "
                            "once and kept in the cache)")
    group.add_argument("--tls-cert", type=Path, default=None, metavar="FILE", help="PEM certificate (chain) for HTTPS")
    group.add_argument("--tls-key", type=Path, default=None, metavar="FILE", help="its PEM private key, unencrypted")

"""`mlx-sdxs camera`: flags, and a session that wires source → loop → display for any backend.

The CLI supplies the backend factory; this module only knows the `Backend` protocol.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from mlx_sdxs.backends.base import Backend
from mlx_sdxs.camera.display import (DisplayStage, FramesWriter, OpenCVWindow, OutputError, VideoRecorder,
                                     display_available)
from mlx_sdxs.camera.loop import LoopControl, run_loop
from mlx_sdxs.camera.preview import PreviewServer
from mlx_sdxs.camera.prompts import GALLERY, load_prompts
from mlx_sdxs.camera.sources import open_source
from mlx_sdxs.errors import SDXSError

RENDER_SIZE_RANGE = (128, 1024)
DEFAULT_PREVIEW_PORT = 8765
#: Largest grey-level change of a 32×32-thumbnail cell below which a frame is not re-processed: above a
#: webcam's sensor noise averaged over a cell (~1 level), below any visible motion.
DEFAULT_SIMILARITY = 3.0


def _number(kind, low: float, high: float | None, flag: str):
    """argparse type: a number in [low, high] (high None = unbounded), the range named in the error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a{'n integer' if kind is int else ' number'}, "
                                             f"got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{flag} must be in {bounds}, got {text}")
        return value

    return parse


def render_size(text: str) -> int:
    """argparse type for --render-size: a multiple of 64 (the UNet downsamples the 1/8 latent 3×)."""
    low, high = RENDER_SIZE_RANGE
    value = _number(int, low, high, "--render-size")(text)
    if value % 64:
        raise argparse.ArgumentTypeError(f"--render-size must be a multiple of 64 in [{low}, {high}] "
                                         f"(e.g. 256, 320, 384, 512), got {value}")
    return value


def capture_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        size = int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--capture-size must look like 640x480, got {text!r}") from None
    if min(size) < 16 or max(size) > 8192:
        raise argparse.ArgumentTypeError(f"--capture-size sides must be in [16, 8192], got {text}")
    return size


def add_camera_arguments(parser: argparse.ArgumentParser) -> None:
    """The camera session's flags (the backend/model flags are the CLI's)."""
    source = parser.add_argument_group("source")
    source.add_argument("--source", "--camera", dest="source", default=None,
                        help="camera index (0, 1, …), a video file, 'synthetic' (built-in moving scene) or "
                             "'synthetic:IMAGE' (pan/zoom over an image). Default: camera 0, else synthetic")
    source.add_argument("--capture-size", type=capture_size, default=(640, 480), metavar="WxH",
                        help="requested camera / synthetic frame size (default 640x480)")
    source.add_argument("--fps", type=_number(float, 0.0, 240.0, "--fps"), default=None,
                        help="camera/synthetic rate (default 30); for a video, overrides its own rate (0 = unpaced)")
    source.add_argument("--no-loop", dest="loop", action="store_false", help="stop at the end of a video file")

    style = parser.add_argument_group("style")
    style.add_argument("--prompt", default=None, help="initial prompt (default: the first of the gallery / --prompts)")
    style.add_argument("--prompts", type=Path, default=None, help="UTF-8 file, one prompt per line, cycled with n/p")
    style.add_argument("--blend", type=_number(float, 0.0, 1.0, "--blend"), default=0.0,
                       help="camera blend: shown = (1-blend)*AI + blend*camera (keys +/-; default 0)")
    style.add_argument("--ema", type=_number(float, 0.0, 0.99, "--ema"), default=0.4,
                       help="EMA smoothing of the AI image: shown = ema*previous + (1-ema)*new (keys e/d; default 0.4)")
    style.add_argument("--feedback", type=_number(float, 0.0, 1.0, "--feedback"), default=0.1,
                       help="latent feedback of the previous frame (seed default 0.1)")
    style.add_argument("--render-size", type=render_size, default=None,
                       help=f"model resolution: a multiple of 64 in {list(RENDER_SIZE_RANGE)}, e.g. 256/320/384/512 "
                            "(default: 512 on a GPU, 256 on a CPU)")
    style.add_argument("--output-size", type=_number(int, 64, 2048, "--output-size"), default=512,
                       help="side of each half of the displayed frame (default 512)")
    style.add_argument("--similarity-threshold", type=_number(float, 0.0, 255.0, "--similarity-threshold"),
                       default=DEFAULT_SIMILARITY,
                       help="skip inference when no cell of a 32x32 grey thumbnail changed by this many grey "
                            f"levels since the last processed frame; 0 = off (default {DEFAULT_SIMILARITY})")

    output = parser.add_argument_group("output")
    output.add_argument("--no-window", "--headless", dest="window", action="store_false",
                        help="no OpenCV window (stop with Ctrl-C, --max-frames or --duration)")
    output.add_argument("--preview-port", type=_number(int, 0, 65535, "--preview-port"), default=None,
                        help="serve an MJPEG preview on http://127.0.0.1:PORT/ (0 = any free port)")
    output.add_argument("--record", type=Path, default=None, metavar="PATH.mp4",
                        help="record the display (mp4v), in real time at the source's frame rate")
    output.add_argument("--record-every-frame", action="store_true",
                        help="record exactly one video frame per displayed frame instead of real time")
    output.add_argument("--frames-dir", type=Path, default=None, help="write every displayed frame as a PNG here")
    output.add_argument("--save-dir", type=Path, default=Path("captures"),
                        help="where the s key saves (default captures/)")
    output.add_argument("--max-frames", type=_number(int, 1, None, "--max-frames"), default=None,
                        help="stop after this many displayed frames")
    output.add_argument("--duration", type=_number(float, 0.0, None, "--duration"), default=None,
                        help="stop after this many seconds (after warm-up)")


def _prompt_list(args: argparse.Namespace) -> tuple[list[str], int]:
    prompts = load_prompts(args.prompts) if args.prompts else list(GALLERY)
    if args.prompt is None:
        return prompts, 0
    if args.prompt not in prompts:
        prompts.insert(0, args.prompt)
    return prompts, prompts.index(args.prompt)


def _open_preview(port: int, fallback: bool) -> PreviewServer:
    try:
        return PreviewServer(port)
    except SDXSError:
        if not fallback:
            raise
        return PreviewServer(0)  # the default port is taken: any free one will do


def run_camera(args: argparse.Namespace, make_backend: Callable[[argparse.Namespace], Backend]) -> int:
    """One camera session from parsed flags; returns the exit status (0, 1 on an error, 130 on Ctrl-C).

    Sets `args.prompt` to the initial prompt before calling `make_backend(args)`.
    """
    log = sys.stderr
    control = LoopControl()
    source = backend = display = None
    looped = False
    status = 0
    try:
        prompts, prompt_index = _prompt_list(args)
        args.prompt = prompts[prompt_index]
        window_wanted, preview_port = args.window, args.preview_port
        window = None
        if window_wanted and display_available():
            try:
                window = OpenCVWindow()
            except OutputError as exc:
                print(f"mlx-sdxs: {exc}", file=log)
        if window_wanted and window is None:
            fallback_port = preview_port if preview_port is not None else DEFAULT_PREVIEW_PORT
            print("mlx-sdxs: no display available (DISPLAY/WAYLAND_DISPLAY unset or no GUI): running without a "
                  f"window, with a live preview on 127.0.0.1 (port {fallback_port} if free)", file=log)
        display = DisplayStage(output_size=args.output_size, prompts=prompts, prompt_index=prompt_index,
                               blend=args.blend, ema=args.ema, window=window, save_dir=args.save_dir, log=log)
        sinks = display.sinks  # outputs are added as they open, so a failure later still closes them
        if preview_port is not None or (window_wanted and window is None):
            preview = _open_preview(preview_port if preview_port is not None else DEFAULT_PREVIEW_PORT,
                                    fallback=preview_port is None)
            sinks.append(preview)
            print(f"mlx-sdxs: live preview at {preview.url} (single frame: {preview.url}frame.jpg)", file=log)
        source = open_source(args.source, size=args.capture_size, fps=args.fps, loop=args.loop, log=log)
        if args.record is not None:
            sinks.append(VideoRecorder(args.record, source.fps, log=log, every_frame=args.record_every_frame))
        if args.frames_dir is not None:
            sinks.append(FramesWriter(args.frames_dir))
        backend = make_backend(args)
        display.label = getattr(backend, "label", None)
        print(f"mlx-sdxs: {source.name} → {backend.name} at {backend.render_size}² "
              f"(prompt {prompt_index + 1}/{len(prompts)}: {args.prompt!r}); warming up…", file=log)
        looped = True
        run_loop(source, backend, display, control=control, prompt=args.prompt, warmup=True,
                 max_frames=args.max_frames, duration=args.duration,
                 similarity_threshold=args.similarity_threshold, log=log)
    except KeyboardInterrupt:
        status = 130
        print("mlx-sdxs: interrupted", file=log)
    except SDXSError as exc:
        status = 1
        print(f"mlx-sdxs: error: {exc}", file=log)
    finally:
        for resource in (display, source, backend):
            if resource is None:
                continue
            try:
                resource.close()
            except SDXSError as exc:
                status = status or 1
                print(f"mlx-sdxs: error: {exc}", file=log)
            except OSError as exc:
                status = status or 1
                print(f"mlx-sdxs: error while closing: {exc}", file=log)
    if looped:
        print(control.stats.summary())
    return status

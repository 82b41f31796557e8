"""A camera session from parsed flags: source → loop → display and outputs, for `camera` and `studio`.

The backend comes from a factory (the CLI's: `backends.open_backend`; tests pass their own); this
module knows only the `Backend` protocol. Ctrl-C and SIGTERM end a session the same way: threads
joined, recording finalised, stats printed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from mlx_sdxs import runtime
from mlx_sdxs.backends.base import Backend
from mlx_sdxs.camera.display import (DisplayStage, FramesWriter, OpenCVWindow, OutputError, StatusLine,
                                     VideoRecorder, display_available)
from mlx_sdxs.camera.loop import LoopControl, run_loop
from mlx_sdxs.camera.prompts import GALLERY, load_prompts
from mlx_sdxs.camera.sources import open_source
from mlx_sdxs.errors import SDXSError
from mlx_sdxs.recipe import RecipeSettings

BackendFactory = Callable[[argparse.Namespace], Backend]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised on the main thread like Ctrl-C so that every output is finalised on the way out."""


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into `Terminated` on the main thread for the duration (a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop: finalising must not be cut short again
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def default_render_size(args: argparse.Namespace) -> tuple[int, int]:
    """512 where SDXS is trained (and a GPU or the comparison backends are used); 256 for MLX on a CPU,
    which runs ~4× more frames there."""
    side = 512 if runtime.on_gpu() or getattr(args, "backend", "mlx") != "mlx" else 256
    return side, side


def stream_settings(args: argparse.Namespace) -> RecipeSettings:
    return RecipeSettings(render_size=args.render_size, feedback=args.feedback, seed=args.seed,
                          strength=args.strength, seed_b=args.seed_b,
                          seed_blend=args.seed_blend if args.seed_b is not None else 0.0)


def prompt_list(args: argparse.Namespace) -> tuple[list[str], int]:
    """The gallery (or --prompts) with --prompt in it, and the index to start at."""
    prompts = load_prompts(args.prompts) if args.prompts else list(GALLERY)
    if args.prompt is None:
        return prompts, 0
    if args.prompt not in prompts:
        prompts.insert(0, args.prompt)
    return prompts, prompts.index(args.prompt)


def _open_server(args: argparse.Namespace, control: LoopControl, display: DisplayStage, source, log):
    """The studio's web server over this session (the camera's --preview-port uses it too)."""
    from mlx_sdxs.studio import open_server

    return open_server(args, control, display, source, log)


def run_camera(args: argparse.Namespace, make_backend: BackendFactory, *, studio: bool = False) -> int:
    """One session from parsed flags; returns the exit status (0, 1 on an error, 130 on Ctrl-C/SIGTERM).

    Sets `args.prompt` (the initial prompt) and `args.render_size` before calling `make_backend(args)`.
    With `studio`, the web page is the display (no window) and its source picker can switch sources."""
    log = sys.stderr
    control = LoopControl()
    source = backend = display = server = None
    looped = False
    status = 0
    with stop_on_sigterm():
        try:
            prompts, prompt_index = prompt_list(args)
            args.prompt = prompts[prompt_index]
            args.render_size = args.render_size or default_render_size(args)
            window = None
            window_wanted = getattr(args, "window", False) and not studio
            if window_wanted and display_available():
                try:
                    window = OpenCVWindow()
                except OutputError as exc:
                    print(f"mlx-sdxs: {exc}", file=log)
            wants_server = studio or getattr(args, "preview_port", None) is not None
            if window_wanted and window is None:
                print("mlx-sdxs: no display available (DISPLAY/WAYLAND_DISPLAY unset or no GUI): running without a "
                      "window" + ("" if wants_server else "; add --preview-port 0 (studio extra) to watch it in a "
                                  "browser, or use `mlx-sdxs studio`"), file=log)
            display = DisplayStage(output_size=args.output_size, prompts=prompts, prompt_index=prompt_index,
                                   blend=args.blend, ema=args.ema, window=window, save_dir=args.save_dir,
                                   prompt_b=args.prompt_b, prompt_blend=args.prompt_blend if args.prompt_b else 0.0,
                                   seed_blend=args.seed_blend if args.seed_b is not None else None,
                                   status=None if window is not None else StatusLine(log), log=log)
            # The studio starts on the visitor's own webcam unless --source names a server-side one.
            if not (studio and args.source is None):
                source = open_source(args.source, size=args.capture_size, fps=args.fps, loop=args.loop, log=log)
            if wants_server:
                server = _open_server(args, control, display, source, log)
                source = server.source
            if args.record is not None:
                display.sinks.append(VideoRecorder(args.record, source.fps, log=log,
                                                   every_frame=args.record_every_frame, view=args.record_view))
            if args.frames_dir is not None:
                display.sinks.append(FramesWriter(args.frames_dir))
            backend = make_backend(args)
            display.label = getattr(backend, "label", None)
            if server is not None:
                server.attach(backend)
            width, height = backend.render_size
            kernels = f"{backend.name} at {width}x{height}"
            warming = "warming up: " + ("the first frames allocate buffers…" if runtime.compiled_before(kernels) else
                                        f"compiling kernels for {width}x{height} (first use on this machine, kept "
                                        "for later runs)…")
            print(f"mlx-sdxs: {source.name} → {backend.name} at {width}x{height} "
                  f"(prompt {prompt_index + 1}/{len(prompts)}: {args.prompt!r}); {warming}", file=log, flush=True)
            looped = True

            def ready(seconds: float) -> None:
                runtime.remember_compiled(kernels)
                print(f"mlx-sdxs: first frames through the model after {seconds:.1f} s", file=log, flush=True)

            run_loop(source, backend, display, control=control, prompt=args.prompt, warmup=True,
                     prompt_b=args.prompt_b, prompt_blend=args.prompt_blend if args.prompt_b else None,
                     max_frames=args.max_frames, duration=args.duration,
                     similarity_threshold=args.similarity_threshold, log=log, on_ready=ready,
                     on_warmup=lambda s: print(f"mlx-sdxs: still warming up ({s:.0f} s): waiting for the first "
                                               "frames through the model", file=log, flush=True))
        except KeyboardInterrupt as exc:
            status = 130
            print(f"mlx-sdxs: {'terminated (SIGTERM)' if isinstance(exc, Terminated) else 'interrupted'}", file=log)
        except SDXSError as exc:
            status = 1
            print(f"mlx-sdxs: error: {exc}", file=log)
        finally:
            status = _close_all((server, display, source, backend), status, log)
    if looped:
        print(control.stats.summary())
    return status


def _close_all(resources, status: int, log) -> int:
    """Close in order (server before display, so no viewer waits on a closed sink), reporting failures."""
    for resource in resources:
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
    return status

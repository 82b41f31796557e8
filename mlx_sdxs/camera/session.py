"""A camera session: a source, a backend, the presenter and its outputs around the loop, and the session's one
live state. Opened from parsed flags (`camera` and `studio` share them), run once, closed in order whatever
happened. The backend comes from a factory (the CLI's opens MLX/torch/ONNX/CoreML; tests pass their own);
a caller above this layer (the studio) adds its server through the `attach` hook, so this module knows
only the Backend protocol and the camera's own parts.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Protocol, Sequence, TextIO

from mlx_sdxs import runtime
from mlx_sdxs.backends.base import Backend
from mlx_sdxs.camera.loop import run_loop
from mlx_sdxs.camera.picker import DRAW_SOURCE, control_mode_for
from mlx_sdxs.camera.outputs import (DISPLAY_VIEW, FramesWriter, OpenCVWindow, OutputError, StatusLine, VideoRecorder,
                                     display_available)
from mlx_sdxs.camera.broadcast import Broadcast
from mlx_sdxs.camera.presenter import Presenter
from mlx_sdxs.camera.side import SideStream, side_control
from mlx_sdxs.camera.prompts import GALLERY, load_prompts
from mlx_sdxs.camera.sources import FrameSource, open_source
from mlx_sdxs.camera.state import LiveState, LoopControl
from mlx_sdxs.camera.stats import LoopStats
from mlx_sdxs.errors import ConfigError, SDXSError, SourceError
from mlx_sdxs.knobs import KNOBS

BackendFactory = Callable[[argparse.Namespace], Backend]


class Closeable(Protocol):
    def close(self) -> None: ...


def default_render_size(args: argparse.Namespace) -> tuple[int, int]:
    """512 where SDXS is trained (and a GPU or the comparison backends are used); 256 for MLX on a CPU,
    which runs ~4× more frames there."""
    side = 512 if runtime.on_gpu() or getattr(args, "backend", "mlx") != "mlx" else 256
    return side, side


def prompt_list(args: argparse.Namespace) -> tuple[list[str], int]:
    """The gallery (or --prompts) with --prompt in it, and the index to start at."""
    prompts = load_prompts(args.prompts) if args.prompts else list(GALLERY)
    if args.prompt is None:
        return prompts, 0
    if args.prompt not in prompts:
        prompts.insert(0, args.prompt)
    return prompts, prompts.index(args.prompt)


def initial_knobs(args: argparse.Namespace, state: LiveState) -> dict[str, Any]:
    """The flags' value of every knob this session has, requested like any later change."""
    values = {name: getattr(args, name) for name, knob in KNOBS.items() if state.has(knob)}
    return {name: value for name, value in values.items() if value is not None}


class Session:
    """Open with `Session.open`, then `run` once and `close` always (servers first, so no viewer waits on a
    closed output; then the presenter's outputs, the source, the backend)."""

    def __init__(self, args: argparse.Namespace, control: LoopControl, presenter: Presenter, log: TextIO):
        self.args, self.control, self.presenter, self.log = args, control, presenter, log
        self.source: FrameSource | None = None
        self.backend: Backend | None = None
        self.servers: list[Closeable] = []
        #: One per extra --source: a camera loop of its own in the same batch.
        self.sides: list[SideStream] = []
        self.ran = False

    @classmethod
    def open(cls, args: argparse.Namespace, make_backend: BackendFactory, *, studio: bool = False,
             attach: Sequence[Callable[["Session"], Closeable]] = (), log: TextIO | None = None) -> "Session":
        """Everything the flags ask for. Sets `args.prompt` (the initial prompt) and `args.render_size` before
        calling `make_backend(args)`. With `studio` there is no window, and without --source no source yet
        (the page's webcam comes through an `attach` hook: each hook adds a control surface or server). A failure closes what was opened, then raises."""
        log = log if log is not None else sys.stderr
        if DRAW_SOURCE in args.sources and not studio:
            raise SourceError("--source draw is the studio page's drawing canvas: run `mlx-sdxs studio --source draw`")
        if studio and len(args.sources) > 1:
            raise SourceError("the studio takes one --source (its own stream); each visitor brings a webcam or canvas")
        args.control = args.control or control_mode_for(args.source)
        prompts, index = prompt_list(args)
        args.prompt = prompts[index]
        args.render_size = args.render_size or default_render_size(args)
        control = LoopControl(LiveState(gallery=tuple(prompts), render_size=tuple(args.render_size),
                                        has_seed_b=args.seed_b is not None))
        # Before any control surface is attached, so a knob turned while the model loads wins over the flag.
        control.request(**initial_knobs(args, control.state))
        session = cls(args, control, cls._presenter(args, studio, bool(attach), log), log)
        try:
            if not (studio and args.source in (None, DRAW_SOURCE)):
                session.source = open_source(args.source, size=args.capture_size, fps=args.fps, loop=args.loop, log=log)
            session.servers.extend(hook(session) for hook in attach)
            session._add_files()
            session.backend = make_backend(args)
            backend = session.backend
            control.publish(backend=backend.name, label=backend.label, render_size=tuple(backend.render_size),
                            controlled=backend.controlled)
            if backend.controlled:  # the knobs only a model with a ControlNet has
                control.request(**{name: value for name, value in initial_knobs(args, control.state).items()
                                   if KNOBS[name].requires == "controlnet"})
            for number, name in enumerate(args.sources[1:], start=2):
                session.sides.append(session._side(name, number))
        except BaseException:
            session.close(1)
            raise
        return session

    @staticmethod
    def _presenter(args: argparse.Namespace, studio: bool, served: bool, log: TextIO) -> Presenter:
        window = None
        if getattr(args, "window", False) and not studio:
            if display_available():
                try:
                    window = OpenCVWindow()
                except OutputError as exc:
                    print(f"mlx-sdxs: {exc}", file=log)
            if window is None:
                print("mlx-sdxs: no display available (DISPLAY/WAYLAND_DISPLAY unset or no GUI): running without a "
                      "window" + ("" if served else "; add --preview-port 0 (studio extra) to watch it in a browser, "
                                  "or use `mlx-sdxs studio`"), file=log)
        return Presenter(output_size=args.output_size, window=window, save_dir=args.save_dir,
                         status=None if window is not None else StatusLine(log), log=log)

    def _side(self, name: str, number: int) -> SideStream:
        """The stream of an extra --source: its own loop and knobs (from the same flags), recording to its own
        numbered files, its display tiled under the window's."""
        args = self.args
        open_stream = getattr(self.backend, "open_stream", None)
        if open_stream is None:
            raise ConfigError(f"several --source values need a backend that batches streams (the {self.backend.name} "
                              "backend here has one stream)")
        source = open_source(name, size=args.capture_size, fps=args.fps, loop=args.loop, log=self.log)
        tile = Broadcast(DISPLAY_VIEW)
        presenter = Presenter(output_size=args.output_size, sinks=[tile], save_dir=args.save_dir, log=self.log)
        self.presenter.tiles.append(tile)
        self._add_files(presenter, source, number)
        return SideStream(source, open_stream(), side_control(self.control), presenter)

    def _add_files(self, presenter: Presenter | None = None, source: FrameSource | None = None,
                   number: int = 1) -> None:
        """--record and --frames-dir for a stream: as given for the first, numbered (`out-2.mp4`, `frames/2/`) for
        the other sources'."""
        args, presenter, source = self.args, presenter or self.presenter, source or self.source
        if args.record is not None:
            path = args.record if number == 1 else args.record.with_name(f"{args.record.stem}-{number}{args.record.suffix}")
            presenter.sinks.append(VideoRecorder(path, source.fps, log=self.log, every_frame=args.record_every_frame,
                                                 view=args.record_view))
        if args.frames_dir is not None:
            presenter.sinks.append(FramesWriter(args.frames_dir if number == 1 else args.frames_dir / str(number)))

    def run(self) -> LoopStats:
        """The loop until a flag's limit, the source's end, a quit key, Ctrl-C or SIGTERM, or an error (raised)."""
        args, backend, log = self.args, self.backend, self.log
        width, height = backend.render_size
        kernels = f"{backend.name} at {width}x{height}"
        warming = "the first frames allocate buffers…" if runtime.compiled_before(kernels) else \
            f"compiling kernels for {width}x{height} (first use on this machine, kept for later runs)…"
        state = self.control.state
        print(f"mlx-sdxs: {self.source.name} → {backend.name} at {width}x{height} (prompt "
              f"{state.gallery.index(args.prompt) + 1}/{len(state.gallery)}: {args.prompt!r}); warming up: {warming}",
              file=log, flush=True)

        def ready(seconds: float) -> None:
            runtime.remember_compiled(kernels)
            for side in self.sides:
                side.start()
            print(f"mlx-sdxs: first frames through the model after {seconds:.1f} s", file=log, flush=True)

        def still_warming(seconds: float) -> None:
            print(f"mlx-sdxs: still warming up ({seconds:.0f} s): waiting for the first frames through the model",
                  file=log, flush=True)

        self.ran = True
        return run_loop(self.source, backend, self.presenter, control=self.control, warmup=True,
                        max_frames=args.max_frames, duration=args.duration, log=log, on_ready=ready,
                        on_warmup=still_warming)

    def close(self, status: int) -> int:
        """Close everything in order, reporting failures; returns `status`, or 1 if it was 0 and a close failed."""
        for resource in (*self.servers, *self.sides, self.presenter, self.source, self.backend):
            if resource is None:
                continue
            try:
                resource.close()
            except SDXSError as exc:
                status = status or 1
                print(f"mlx-sdxs: error: {exc}", file=self.log)
            except OSError as exc:
                status = status or 1
                print(f"mlx-sdxs: error while closing: {exc}", file=self.log)
        return status

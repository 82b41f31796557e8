"""`mlx-sdxs studio`: the live demo in a browser, with the visitor's own webcam (the `studio` extra:
Starlette + Uvicorn). The page is plain HTML/JS/CSS in `static/`; the server is `server.StudioServer`, which
a camera session takes through its `attach` hook (`mlx-sdxs studio`, and `camera --preview-port`)."""

from __future__ import annotations

import argparse
import sys
import webbrowser
from functools import partial
from typing import Callable, TextIO

from mlx_sdxs.errors import SDXSError


def server_hook(args: argparse.Namespace, studio: bool, log: TextIO | None = None) -> Callable:
    """The `attach` hook that serves a camera session: the page can switch between the session's --source
    (if any), the browser's webcam, its drawing canvas, camera 0 and the synthetic scene; it sees the AI,
    camera and display views and can record. `studio`: the `studio` command (its --host/--port), else `--preview-port`."""
    log = log if log is not None else sys.stderr
    try:
        from mlx_sdxs.studio.server import LOOPBACK, StudioServer
    except ImportError as exc:
        raise SDXSError(f"the studio needs its web server ({exc.name} is not installed): "
                        "pip install 'mlx-sdxs[studio]'") from None
    from mlx_sdxs.camera.picker import BROWSER_SOURCE, DRAW_SOURCE, BrowserSource, SwitchableSource
    from mlx_sdxs.camera.sources import SyntheticSource, open_source

    host = args.host if studio else "127.0.0.1"
    port = args.port if studio else args.preview_port
    if host not in LOOPBACK:
        print(f"mlx-sdxs: warning: listening on {host}, not only this machine: anyone who can reach it and "
              "has the URL's token can watch and steer the camera", file=log)

    def attach(session) -> StudioServer:
        source = session.source
        fps = getattr(source, "fps", 30.0) or 30.0
        # The page's webcam and its drawing canvas (a sketch for a ControlNet; an image to restyle for any model).
        openers = {BROWSER_SOURCE: partial(BrowserSource, fps),
                   DRAW_SOURCE: partial(BrowserSource, fps, "drawing canvas")}
        if source is not None:
            openers[source.name] = lambda: source
        openers.setdefault("synthetic", partial(SyntheticSource, *args.capture_size, fps))
        openers.setdefault("camera 0", partial(open_source, "0", size=args.capture_size, fps=args.fps, log=log))
        first = source.name if source is not None else DRAW_SOURCE if args.source == DRAW_SOURCE else BROWSER_SOURCE
        session.source = SwitchableSource(openers, first, fps)
        server = StudioServer(session.control, session.source, host=host, port=port, save_dir=args.save_dir, log=log,
                              title="mlx-sdxs studio" if studio else "mlx-sdxs camera")
        session.presenter.sinks.extend(server.sinks)
        server.start()
        print(f"mlx-sdxs: studio at {server.url}  (MJPEG: http://{host}:{server.port}/stream.mjpg?token={server.token})",
              file=log, flush=True)
        if getattr(args, "open", False):
            webbrowser.open(server.url)
        return server

    return attach

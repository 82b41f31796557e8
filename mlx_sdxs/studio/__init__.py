"""`mlx-sdxs studio`: the live demo in a browser, with the visitor's own webcam (the `studio` extra:
Starlette + Uvicorn). The page is plain HTML/JS/CSS in `static/`; the server is `server.StudioServer`, which
a camera session takes through its `attach` hook (`mlx-sdxs studio`, and `camera --preview-port`)."""

from __future__ import annotations

import argparse
import sys
import webbrowser
from functools import partial
from typing import Callable, TextIO

from mlx_sdxs import loopback
from mlx_sdxs.errors import SDXSError


def server_hook(args: argparse.Namespace, studio: bool, log: TextIO | None = None) -> Callable:
    """The `attach` hook that serves a camera session: the host's page can switch the session's stream between its
    --source (if any), the page's webcam, its drawing canvas, camera 0 and the synthetic scene; it sees the AI,
    camera and display views and can record. `studio`: the `studio` command (its --host/--port; each visitor's
    page gets a stream of its own, up to --max-streams), else `--preview-port` (every page watches the session)."""
    log = log if log is not None else sys.stderr
    try:
        from mlx_sdxs.studio import invite, network, tls
        from mlx_sdxs.studio.server import StudioServer
        from mlx_sdxs.studio.visitors import Visitors, VisitorStream
    except ImportError as exc:
        raise SDXSError(f"the studio needs its web server ({exc.name} is not installed): "
                        "pip install 'mlx-sdxs[studio]'") from None
    from mlx_sdxs.camera.picker import BROWSER_SOURCE, DRAW_SOURCE, BrowserSource, SwitchableSource
    from mlx_sdxs.camera.sources import DEFAULT_FPS, SYNTHETIC, SyntheticSource, open_source

    host = args.host if studio else loopback.HOST
    port = args.port if studio else args.preview_port
    if host not in loopback.NAMES:
        print(f"mlx-sdxs: warning: listening on {host}, not only this machine: anyone who can reach it and "
              "has the URL's token can watch and steer the camera", file=log)
    # Made (or checked) now, so a bad certificate is an error before the model loads.
    certificate = tls.choose(getattr(args, "tls", None), getattr(args, "tls_cert", None),
                             getattr(args, "tls_key", None), host,
                             {*network.machine_names(), *network.listening_names(host)})

    def attach(session) -> StudioServer:
        source = session.source
        fps = getattr(source, "fps", DEFAULT_FPS) or DEFAULT_FPS
        # The page's webcam and its drawing canvas (a sketch for a ControlNet; an image to restyle for any model).
        openers = {BROWSER_SOURCE: partial(BrowserSource, fps),
                   DRAW_SOURCE: partial(BrowserSource, fps, "drawing canvas")}
        if source is not None:
            openers[source.name] = lambda: source
        openers.setdefault(SYNTHETIC, partial(SyntheticSource, *args.capture_size, fps))
        openers.setdefault("camera 0", partial(open_source, "0", size=args.capture_size, fps=args.fps, log=log))
        page = DRAW_SOURCE if args.source == DRAW_SOURCE else BROWSER_SOURCE  # what a page starts on: canvas or webcam
        first = source.name if source is not None else page
        session.source = SwitchableSource(openers, first, fps)

        def open_visitor() -> VisitorStream | None:
            """A visitor's own stream in the host's batch; None until the model has loaded."""
            open_stream = getattr(session.backend, "open_stream", None)
            if open_stream is None:
                return None
            backend = open_stream()
            try:
                stream = VisitorStream(backend, session.control, fps, args.output_size, page)
            except BaseException:
                backend.close()
                raise
            stream.start()
            return stream

        visitors = Visitors(open_visitor, args.max_streams, partial(print, file=log)) if studio else None
        server = StudioServer(session.control, session.source, host=host, port=port, save_dir=args.save_dir, log=log,
                              title="mlx-sdxs studio" if studio else "mlx-sdxs camera", certificate=certificate,
                              visitors=visitors)
        session.presenter.sinks.extend(server.sinks)
        server.start()
        invite.announce(server, log)
        if getattr(args, "open", False):
            webbrowser.open(server.host_url)
        return server

    return attach

"""`mlx-sdxs studio`: the live demo in a browser, with the visitor's own webcam (the `studio` extra:
Starlette + Uvicorn). The page is plain HTML/JS/CSS in `static/`; the server is `server.StudioServer`."""

from __future__ import annotations

import sys
import webbrowser
from functools import partial

from mlx_sdxs.errors import SDXSError



def open_server(args, control, display, source, log=None):
    """The studio server over this session. `source` is the source opened from --source (None: the
    browser's webcam first); the page can switch between it, the browser webcam, camera 0 and the
    synthetic scene."""
    log = log if log is not None else sys.stderr
    try:
        from mlx_sdxs.studio.server import StudioServer
    except ImportError as exc:
        raise SDXSError(f"the studio needs its web server ({exc.name} is not installed): "
                        "pip install 'mlx-sdxs[studio]'") from None
    from mlx_sdxs.camera.sources import BrowserSource, SwitchableSource, SyntheticSource, open_source

    fps = getattr(source, "fps", 30.0) or 30.0
    openers = {"browser": partial(BrowserSource, fps)}
    if source is not None:
        openers[source.name] = lambda: source
    openers.setdefault("synthetic", partial(SyntheticSource, *args.capture_size, fps))
    openers.setdefault("camera 0", partial(open_source, "0", size=args.capture_size, fps=args.fps, log=log))
    switchable = SwitchableSource(openers, source.name if source is not None else "browser", fps)
    studio = getattr(args, "port", None) is not None and getattr(args, "preview_port", None) is None
    host = getattr(args, "host", "127.0.0.1") if studio else "127.0.0.1"
    port = args.port if studio else args.preview_port
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mlx-sdxs: warning: listening on {host}, not only this machine: anyone who can reach it and "
              "has the URL's token can watch and steer the camera", file=log)
    server = StudioServer(control, display, switchable, host=host, port=port, save_dir=args.save_dir, log=log,
                          title="mlx-sdxs studio" if studio else "mlx-sdxs camera")
    print(f"mlx-sdxs: studio at {server.url}  (MJPEG: http://{host}:{server.port}/stream.mjpg?token={server.token})",
          file=log, flush=True)
    if getattr(args, "open", False):
        webbrowser.open(server.url)
    return server

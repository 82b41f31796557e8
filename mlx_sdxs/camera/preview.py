"""A local MJPEG preview over HTTP (stdlib only), for headless machines and remote sessions.

Bound to 127.0.0.1 only: the camera image never leaves the machine unless the user tunnels it.
`/` and `/stream.mjpg` stream multipart/x-mixed-replace JPEGs (a browser shows them as live video);
`/frame.jpg` returns the latest frame once.
"""

from __future__ import annotations

import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import cv2
import numpy as np

from mlx_sdxs.errors import SDXSError

HOST = "127.0.0.1"
BOUNDARY = "mlxsdxsframe"
#: How long `/frame.jpg` waits for a first frame, and how often a stream re-checks for shutdown.
FIRST_FRAME_WAIT_S = 5.0
STREAM_POLL_S = 0.5


class _Server(ThreadingHTTPServer):
    # Non-daemon handler threads are joined by server_close(), so closing leaves no thread behind.
    daemon_threads = False
    block_on_close = True


class PreviewServer:
    """Serves the newest published frame; `write` is a display sink (encodes once per frame)."""

    def __init__(self, port: int, quality: int = 80):
        self.quality = quality
        self._cond = threading.Condition()
        self._jpeg: bytes | None = None
        self._seq = 0
        self._closing = False
        try:
            self._httpd = _Server((HOST, port), self._handler_class())
        except OSError as exc:
            raise SDXSError(f"--preview-port {port}: cannot listen on {HOST}:{port} ({exc.strerror})") from None
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="sdxs-preview", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def write(self, frame: np.ndarray, now: float = 0.0) -> None:
        ok, encoded = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            return
        with self._cond:
            self._jpeg = encoded.tobytes()
            self._seq += 1
            self._cond.notify_all()

    def next_jpeg(self, after_seq: int, timeout: float) -> tuple[int, bytes] | None:
        """The newest JPEG with seq > after_seq; None on timeout or shutdown."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > after_seq or self._closing, timeout)
            if self._closing or self._seq <= after_seq:
                return None
            return self._seq, self._jpeg

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(2.0)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        preview = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 2.0  # a silent client cannot hold shutdown for long

            def do_GET(self) -> None:  # noqa: N802 — http.server's naming
                path = urlsplit(self.path).path
                if path in ("/", "/stream.mjpg"):
                    self._stream()
                elif path == "/frame.jpg":
                    self._single()
                else:
                    self.send_error(HTTPStatus.NOT_FOUND, "try / , /stream.mjpg or /frame.jpg")

            def _single(self) -> None:
                latest = preview.next_jpeg(0, FIRST_FRAME_WAIT_S)
                if latest is None:
                    self.send_error(HTTPStatus.SERVICE_UNAVAILABLE, "no frame yet")
                    return
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(latest[1])))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(latest[1])

            def _stream(self) -> None:
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                seq = 0
                try:
                    while not preview.closing:
                        latest = preview.next_jpeg(seq, STREAM_POLL_S)
                        if latest is None:
                            continue
                        seq, jpeg = latest
                        self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                                         f"Content-Length: {len(jpeg)}\r\n\r\n".encode() + jpeg + b"\r\n")
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    pass  # the viewer went away

            def log_message(self, format: str, *args) -> None:  # noqa: A002 — keep the terminal for the loop
                pass

        return Handler

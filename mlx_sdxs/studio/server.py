"""The studio's web server: one Starlette app over a running camera session, served by Uvicorn on its own thread.
It reads the session's live state and turns the page's controls into `LoopControl` requests; its own parts are
outputs (the broadcasts, the recorder) and the source picker. It never touches the model.

Routes (every one behind `guard.Guard`: loopback Host, the per-run token, same Origin for the WebSocket):
    GET /                 the page          GET /stream.mjpg    the display, as MJPEG
    GET /frame.jpg        one display frame GET /snapshot.png   the AI image as shown, lossless
    GET /api/status       live figures      GET /recordings/F   a finished recording
    WS  /ws               binary in: the page's webcam as JPEG; binary out: tagged JPEGs (1 = AI, 2 = camera);
                          text both ways: JSON controls in, status out
Latest frame wins both ways: an incoming frame replaces an unprocessed one, and each viewer is sent the
newest frame when it is ready for one, skipping the rest.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import sys
import threading
import time
from collections import Counter
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from mlx_sdxs.camera.broadcast import Broadcast
from mlx_sdxs.camera.picker import SwitchableSource
from mlx_sdxs.camera.state import LoopControl
from mlx_sdxs.errors import SDXSError
from mlx_sdxs.studio.controls import Controls
from mlx_sdxs.studio.guard import Guard
from mlx_sdxs.studio.recording import RecordingSink

LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: Above this a WebSocket message is refused by the protocol layer itself (the connection closes).
MAX_MESSAGE_BYTES = 64 << 20
STATUS_EVERY_S = 0.5
TAG_AI, TAG_CAMERA = b"\x01", b"\x02"
BOUNDARY = "mlxsdxsframe"
ASSETS = {"app.js": "text/javascript", "draw.js": "text/javascript", "app.css": "text/css"}


class StudioServer:
    """Build it, add its `sinks` to the presenter, `start` it, `close` it. `source` is the picker the session reads."""

    def __init__(self, control: LoopControl, source: SwitchableSource, *, host: str = "127.0.0.1", port: int = 0,
                 title: str = "mlx-sdxs studio", save_dir: Path = Path("captures"), log=None):
        self.control, self.source, self.title = control, source, title
        self.host, self.port = host, port
        self.log = log if log is not None else sys.stderr
        self.token = secrets.token_urlsafe(24)
        self.broadcasts = {view: Broadcast(view) for view in ("ai", "camera", "display")}
        self.recordings = RecordingSink(Path(save_dir), source.fps, self.log)
        self.controls = Controls(control, source, self.recordings, Counter())
        self.viewers = 0
        self._closing = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def sinks(self) -> list:
        """The outputs the presenter feeds: one broadcast per view, and the recorder."""
        return [*self.broadcasts.values(), self.recordings]

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Bind (SDXSError naming the address if it cannot) and serve on a thread; returns once it listens."""
        self._socket = _bind(self.host, self.port)
        self.port = self._socket.getsockname()[1]
        allowed = {f"{h}:{self.port}" for h in (*LOOPBACK, "[::1]", self.host)}
        # No permessage-deflate: JPEGs do not compress, and zlib on every frame for every viewer cost 14× the
        # CPU of sending them (0.38 vs 0.027 cores for 20 viewers at 30 FPS), starving the model's threads.
        config = uvicorn.Config(self.app(allowed), log_level="warning", ws_max_size=MAX_MESSAGE_BYTES, lifespan="off",
                                timeout_graceful_shutdown=2, ws_per_message_deflate=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="sdxs-studio", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)  # uvicorn signals readiness only through this flag
        if not self._server.started:
            raise SDXSError(f"the studio server did not start on {self.host}:{self.port}")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/?token={self.token}"

    def close(self) -> None:
        """Stop serving: viewers are released, the port is free when this returns."""
        if self._closing.is_set():
            return
        self._closing.set()
        for broadcast in self.broadcasts.values():
            broadcast.close()
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(5)
        if self._socket is not None:
            self._socket.close()

    def status(self) -> dict[str, Any]:
        return {**self.controls.status(), "viewers": self.viewers}

    # --- routes ------------------------------------------------------------------------------------
    def app(self, allowed_hosts: set[str]) -> Starlette:
        routes = [Route("/", self.page), Route("/static/{name}", self.asset), Route("/api/status", self.status_route),
                  Route("/frame.jpg", self.frame), Route("/snapshot.png", self.snapshot),
                  Route("/stream.mjpg", self.mjpeg), Route("/recordings/{name}", self.recording),
                  WebSocketRoute("/ws", self.websocket)]
        return Starlette(routes=routes, middleware=[Middleware(Guard, token=self.token, allowed_hosts=allowed_hosts)])

    async def page(self, request: Request) -> Response:
        html = (resources.files("mlx_sdxs.studio") / "static" / "index.html").read_text()
        return Response(html.replace("{{TITLE}}", self.title), media_type="text/html",
                        headers={"Cache-Control": "no-store"})

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return PlainTextResponse("not found", status_code=404)
        return Response((resources.files("mlx_sdxs.studio") / "static" / name).read_text(), media_type=ASSETS[name])

    async def status_route(self, request: Request) -> Response:
        return JSONResponse(self.status())

    async def frame(self, request: Request) -> Response:
        latest = await self.broadcasts["display"].next_async(0, 5)
        if latest is None:
            return PlainTextResponse("no frame yet", status_code=503)
        return Response(latest[1], media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def snapshot(self, request: Request) -> Response:
        shown = self.broadcasts["ai"].latest_frame()
        if shown is None:
            return PlainTextResponse("no frame yet", status_code=503)
        ok, png = cv2.imencode(".png", shown)
        return Response(png.tobytes(), media_type="image/png",
                        headers={"Content-Disposition": f'attachment; filename="mlx-sdxs-{datetime.now():%H%M%S}.png"'})

    async def mjpeg(self, request: Request) -> Response:
        async def parts():
            seq = 0
            while not self._closing.is_set():
                latest = await self.broadcasts["display"].next_async(seq, 0.5)
                if latest is None:
                    continue
                seq, jpeg = latest
                yield (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                       .encode() + jpeg + b"\r\n")

        return StreamingResponse(parts(), media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                                 headers={"Cache-Control": "no-store"})

    async def recording(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.recordings.finished:
            return PlainTextResponse("no such recording", status_code=404)
        return FileResponse(self.recordings.folder / name, media_type="video/mp4")

    async def websocket(self, websocket: WebSocket) -> None:
        await websocket.accept()
        self.viewers += 1
        tasks = [asyncio.ensure_future(self._receive(websocket)), asyncio.ensure_future(self._send(websocket))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except WebSocketDisconnect:
            pass
        finally:
            self.viewers -= 1
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _receive(self, websocket: WebSocket) -> None:
        """A viewer's frames (its webcam) and controls."""
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                await asyncio.to_thread(self.controls.accept_frame, message["bytes"])
                continue
            reply = self.controls.handle_text(message.get("text") or "")
            if reply is not None:
                await websocket.send_text(json.dumps(reply))

    async def _send(self, websocket: WebSocket) -> None:
        """The newest AI frame (and the server's camera frame) when this viewer is ready, and the status."""
        seqs = {"ai": 0, "camera": 0}
        next_status = 0.0
        while not self._closing.is_set():
            latest = await self.broadcasts["ai"].next_async(seqs["ai"], STATUS_EVERY_S)
            if latest is not None:
                seqs["ai"] = latest[0]
                await websocket.send_bytes(TAG_AI + latest[1])
                if self.source.current != "browser":
                    camera = await self.broadcasts["camera"].next_async(seqs["camera"], 0)
                    if camera is not None:
                        seqs["camera"] = camera[0]
                        await websocket.send_bytes(TAG_CAMERA + camera[1])
            now = time.monotonic()
            if now >= next_status:
                next_status = now + STATUS_EVERY_S
                await websocket.send_text(json.dumps({"type": "status", **self.status()}))


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SDXSError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port (0 = any free)") from None
    sock.listen(128)
    return sock

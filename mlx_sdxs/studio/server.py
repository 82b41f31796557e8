"""The studio's web server: one Starlette app over a running camera session, served by Uvicorn on its own thread.
It reads the session's live state and turns the page's controls into `LoopControl` requests; its own parts are
outputs (the broadcasts, the recorder) and the source picker. It never touches the model.

Routes (every one behind `guard.Guard`: one of this machine's names as Host, a per-run token — the visitor's or
the host's —, same Origin for the WebSocket; HTTPS with a `tls.Certificate` when other devices visit):
    GET /                 the page          GET /stream.mjpg    the display, as MJPEG
    GET /frame.jpg        one display frame GET /snapshot.png   the AI image as shown, lossless
    GET /api/status       live figures      GET /recordings/F   a finished recording (host only)
    GET /api/knobs        the knob table (what the page draws its controls from)
    GET /api/whoami       the page's role (and, for the host, the visitor URL)
    GET /qr.svg           the visitor URL as a QR code (host only)
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

from mlx_sdxs import loopback
from mlx_sdxs.camera.broadcast import Broadcast
from mlx_sdxs.camera.outputs import AI_VIEW, CAMERA_VIEW, DISPLAY_VIEW, SAVE_DIR, VIEWS
from mlx_sdxs.camera.picker import BROWSER_SOURCE, SwitchableSource
from mlx_sdxs.camera.state import LoopControl
from mlx_sdxs.errors import SDXSError
from mlx_sdxs.knobs import TABLE
from mlx_sdxs.studio import invite, network
from mlx_sdxs.studio.controls import Controls
from mlx_sdxs.studio.guard import HOST, ROLE, VISITOR, Guard, control_refusal
from mlx_sdxs.studio.recording import RecordingSink
from mlx_sdxs.studio.tls import Certificate
from mlx_sdxs.studio.visitors import MOST_STREAMS, Seat, Visitors

#: Above this a WebSocket message is refused by the protocol layer itself (the connection closes).
MAX_MESSAGE_BYTES = 64 << 20
STATUS_EVERY_S = 0.5
TAG_AI, TAG_CAMERA = b"\x01", b"\x02"
BOUNDARY = "mlxsdxsframe"
ASSETS = {"app.js": "text/javascript", "draw.js": "text/javascript", "app.css": "text/css"}


class StudioServer:
    """Build it, add its `sinks` to the presenter, `start` it, `close` it. `source` is the picker the session reads."""

    def __init__(self, control: LoopControl, source: SwitchableSource, *, host: str = loopback.HOST, port: int = 0,
                 title: str = "mlx-sdxs studio", save_dir: Path = SAVE_DIR, certificate: Certificate | None = None,
                 visitors: Visitors | None = None, log=None):
        self.control, self.source, self.title = control, source, title
        #: Each visitor's own stream (None: every page watches and steers the host's stream, as `--preview-port`).
        self.visitors = visitors
        self.host, self.port, self.certificate = host, port, certificate
        self.addresses = network.visitor_addresses(host)  # where visitors are sent, best first
        self.log = log if log is not None else sys.stderr
        self.token = secrets.token_urlsafe(24)  # the visitors' (the printed URL, the QR code)
        self.host_token = secrets.token_urlsafe(24)  # the host's: host-only routes and controls too
        self.broadcasts = {view: Broadcast(view) for view in VIEWS}
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
        allowed = network.host_headers(self.host, self.port, self.scheme)
        tls = {} if self.certificate is None else {"ssl_certfile": str(self.certificate.cert),
                                                    "ssl_keyfile": str(self.certificate.key)}
        # No permessage-deflate: JPEGs do not compress, and zlib on every frame for every viewer cost 14× the
        # CPU of sending them (0.38 vs 0.027 cores for 20 viewers at 30 FPS), starving the model's threads.
        config = uvicorn.Config(self.app(allowed), log_level="warning", ws_max_size=MAX_MESSAGE_BYTES, lifespan="off",
                                timeout_graceful_shutdown=2, ws_per_message_deflate=False, **tls)
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
    def scheme(self) -> str:
        return "http" if self.certificate is None else "https"

    def url_at(self, address: str, token: str, path: str = "/") -> str:
        return f"{self.scheme}://{network.authority(address, self.port)}{path}?token={token}"

    @property
    def visitor_urls(self) -> list[str]:
        return [self.url_at(address, self.token) for address in self.addresses]

    @property
    def url(self) -> str:
        """The visitor URL (what the QR code carries)."""
        return self.visitor_urls[0]

    @property
    def host_url(self) -> str:
        return self.url_at(self.addresses[0], self.host_token)

    def close(self) -> None:
        """Stop serving: viewers are released, the port is free when this returns."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self.visitors is not None:
            self.visitors.close_all()
        for broadcast in self.broadcasts.values():
            broadcast.close()
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(5)
        if self._socket is not None:
            self._socket.close()

    def status(self) -> dict[str, Any]:
        """The host's stream, and how many visitors stream or wait."""
        visitors = {} if self.visitors is None else {"visitors_streaming": self.visitors.streaming,
                                                     "visitors_waiting": self.visitors.waiting,
                                                     "max_streams": self.visitors.max_streams}
        return {**self.controls.status(), "viewers": self.viewers, "stream": "host", **visitors}

    # --- routes ------------------------------------------------------------------------------------
    def app(self, allowed_hosts: set[str]) -> Starlette:
        routes = [Route("/", self.page), Route("/static/{name}", self.asset), Route("/api/status", self.status_route),
                  Route("/api/knobs", self.knobs_route), Route("/api/whoami", self.whoami), Route("/qr.svg", self.qr),
                  Route("/frame.jpg", self.frame), Route("/snapshot.png", self.snapshot),
                  Route("/stream.mjpg", self.mjpeg), Route("/recordings/{name}", self.recording),
                  WebSocketRoute("/ws", self.websocket)]
        tokens = {self.token: VISITOR, self.host_token: HOST}
        return Starlette(routes=routes, middleware=[Middleware(Guard, tokens=tokens, allowed_hosts=allowed_hosts)])

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

    async def knobs_route(self, request: Request) -> Response:
        """Every knob of the knob table (the page draws a control for each one the status lists)."""
        return JSONResponse([knob.spec() for knob in TABLE])

    async def whoami(self, request: Request) -> Response:
        """The page's role; the host's page also shows the visitor URL and its QR code (`/qr.svg`)."""
        role = request.scope[ROLE]
        return JSONResponse({"role": role, **({"visitor_url": self.url} if role == HOST else {})})

    async def qr(self, request: Request) -> Response:
        return Response(invite.qr_svg(self.url), media_type="image/svg+xml", headers={"Cache-Control": "no-store"})

    async def frame(self, request: Request) -> Response:
        latest = await self.broadcasts[DISPLAY_VIEW].next_async(0, 5)
        if latest is None:
            return PlainTextResponse("no frame yet", status_code=503)
        return Response(latest[1], media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def snapshot(self, request: Request) -> Response:
        shown = self.broadcasts[AI_VIEW].latest_frame()
        if shown is None:
            return PlainTextResponse("no frame yet", status_code=503)
        ok, png = cv2.imencode(".png", shown)
        return Response(png.tobytes(), media_type="image/png",
                        headers={"Content-Disposition": f'attachment; filename="mlx-sdxs-{datetime.now():%H%M%S}.png"'})

    async def mjpeg(self, request: Request) -> Response:
        async def parts():
            seq = 0
            while not self._closing.is_set():
                latest = await self.broadcasts[DISPLAY_VIEW].next_async(seq, 0.5)
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
        # The host's page steers the host's stream; a visitor gets a stream of its own (or a place in line).
        seat = await self.visitors.arrive() if self.visitors is not None and websocket.scope[ROLE] == VISITOR else None
        send = self._send(websocket) if seat is None else self._send_visitor(websocket, seat)
        tasks = [asyncio.ensure_future(self._receive(websocket, seat)), asyncio.ensure_future(send)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for failed in (task.exception() for task in done):
                if failed is not None and not isinstance(failed, (WebSocketDisconnect, ConnectionError)):
                    print(f"mlx-sdxs: a page's connection failed: {type(failed).__name__}: {failed}", file=self.log)
        except WebSocketDisconnect:
            pass
        finally:
            self.viewers -= 1
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if seat is not None:
                await self.visitors.leave(seat)

    async def _receive(self, websocket: WebSocket, seat: Seat | None) -> None:
        """A viewer's frames (its webcam or canvas) and controls: for the host's stream, or the visitor's own."""
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            controls = self.controls if seat is None else seat.stream.controls if seat.stream is not None else None
            if message.get("bytes") is not None:
                if controls is not None:
                    await asyncio.to_thread(controls.accept_frame, message["bytes"])
                else:
                    self.controls.dropped["in line"] += 1
                continue
            text = message.get("text") or ""
            refused = control_refusal(websocket.scope[ROLE], text)
            message = _object(text)  # the server's own controls; the stream's go to its `Controls` as text
            if refused:
                reply = {"type": "error", "message": refused}
            elif seat is not None and message.get("type") == "watch":
                seat.watching, reply = bool(message.get("watch")), None
                seat.changed.set()
            elif message.get("type") == "max_streams":
                reply = await self._max_streams(message.get("value"))
            elif controls is None:  # in line: the visitor's choices wait for its stream
                seat.kept.append(text)
                reply = None
            else:
                reply = controls.handle_text(text)
            if reply is not None:
                await websocket.send_text(json.dumps(reply))

    async def _max_streams(self, value: Any) -> dict[str, Any] | None:
        """The host changes how many visitors stream at once."""
        if self.visitors is None or not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MOST_STREAMS:
            self.controls.dropped["bad control"] += 1
            return {"type": "error", "message": f"max streams must be a whole number in [1, {MOST_STREAMS}] (studio only)"}
        await self.visitors.resize(value)
        return None

    async def _send_visitor(self, websocket: WebSocket, seat: Seat) -> None:
        """A visitor's own AI frames and status; in line, its place (and the host's stream while it watches)."""
        seq, shown, next_status = 0, None, 0.0
        while not self._closing.is_set():
            stream = seat.stream
            broadcast = stream.ai if stream is not None else self.broadcasts[AI_VIEW] if seat.watching else None
            if broadcast is not shown:
                seq, shown = 0, broadcast
            if broadcast is None:
                try:
                    await asyncio.wait_for(seat.changed.wait(), STATUS_EVERY_S)
                except asyncio.TimeoutError:
                    await self.visitors.fill()  # the model may have finished loading
            else:
                latest = await broadcast.next_async(seq, STATUS_EVERY_S)
                if latest is not None:
                    seq = latest[0]
                    await websocket.send_bytes(TAG_AI + latest[1])
            now = time.monotonic()
            if now >= next_status or seat.changed.is_set():  # every half second, and at once on a change
                next_status = now + STATUS_EVERY_S
                seat.changed.clear()
                await websocket.send_text(json.dumps(self._visitor_status(seat)))

    def _visitor_status(self, seat: Seat) -> dict[str, Any]:
        if seat.stream is not None:
            return {"type": "status", **seat.stream.status(), "viewers": self.viewers}
        line = {"type": "line", "place": seat.place, "max_streams": self.visitors.max_streams,
                "watching": seat.watching, "loading": not self.visitors.full}
        return {**line, "host": {**self.status(), "type": "status"}} if seat.watching else line

    async def _send(self, websocket: WebSocket) -> None:
        """The newest AI frame (and the server's camera frame) when this viewer is ready, and the status."""
        seqs = {AI_VIEW: 0, CAMERA_VIEW: 0}
        next_status = 0.0
        while not self._closing.is_set():
            latest = await self.broadcasts[AI_VIEW].next_async(seqs[AI_VIEW], STATUS_EVERY_S)
            if latest is not None:
                seqs[AI_VIEW] = latest[0]
                await websocket.send_bytes(TAG_AI + latest[1])
                if self.source.current != BROWSER_SOURCE:
                    camera = await self.broadcasts[CAMERA_VIEW].next_async(seqs[CAMERA_VIEW], 0)
                    if camera is not None:
                        seqs[CAMERA_VIEW] = camera[0]
                        await websocket.send_bytes(TAG_CAMERA + camera[1])
            now = time.monotonic()
            if now >= next_status:
                next_status = now + STATUS_EVERY_S
                await websocket.send_text(json.dumps({"type": "status", **self.status()}))


def _object(text: str) -> dict[str, Any]:
    """A control as a JSON object; {} when the text is not one."""
    try:
        message = json.loads(text)
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


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

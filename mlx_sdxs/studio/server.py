"""The studio's web server: one Starlette app over the running camera loop, served by Uvicorn on its own
thread. The loop owns the models; the server only hands frames in and out and turns the page's
controls into `LoopControl` requests.

Routes (every one needs the per-run token: `?token=` once, then an HttpOnly same-site cookie):
    GET /                 the page          GET /stream.mjpg    the display, as MJPEG
    GET /frame.jpg        one display frame GET /snapshot.png   the AI image as shown, lossless
    GET /api/status       live figures      GET /recordings/F   a finished recording
    WS  /ws               binary in: the page's webcam as JPEG; binary out: tagged JPEGs (1 = AI, 2 = camera);
                          text both ways: JSON controls in, status out
Latest frame wins both ways: an incoming frame replaces an unprocessed one, and each viewer is sent the
newest frame when it is ready for one, skipping the rest. Incoming frames are bounded in bytes and
pixels and decoded defensively: a bad message is dropped and counted, never a crash.
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
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocketDisconnect

from mlx_sdxs.camera.broadcast import Broadcast
from mlx_sdxs.camera.display import DisplayStage, VideoRecorder
from mlx_sdxs.camera.loop import LoopControl
from mlx_sdxs.camera.prompts import GALLERY
from mlx_sdxs.camera.sources import BrowserSource, SwitchableSource
from mlx_sdxs.errors import SDXSError, SourceError
from mlx_sdxs.imageio import MIN_SIDE, header_size
from mlx_sdxs.recipe import check_fraction
from mlx_sdxs.tokenizer import MAX_LENGTH

COOKIE = "mlx_sdxs_token"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: Largest incoming frame: bytes of JPEG, and pixels once its header is read (before decoding).
MAX_FRAME_BYTES = 4 << 20
MAX_FRAME_PIXELS = 4096 * 4096
#: Above this a WebSocket message is refused by the protocol layer itself (the connection closes).
MAX_MESSAGE_BYTES = 64 << 20
MAX_PROMPT_CHARS = 2000
STATUS_EVERY_S = 0.5
TAG_AI, TAG_CAMERA = b"\x01", b"\x02"
BOUNDARY = "mlxsdxsframe"


class RecordingSink:
    """A display sink that records the AI view while the page asks it to; start/stop from the server
    thread, frames from the display thread, one lock between them."""

    view = "ai"

    def __init__(self, folder: Path, fps: float, log):
        self.folder, self.fps, self._log = folder, fps, log
        self._lock = threading.Lock()
        self._recorder: VideoRecorder | None = None
        self.finished: list[str] = []

    @property
    def active(self) -> bool:
        return self._recorder is not None

    def start(self) -> str:
        with self._lock:
            if self._recorder is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                path = self.folder / f"mlx-sdxs-{datetime.now():%Y%m%d-%H%M%S}.mp4"
                self._recorder = VideoRecorder(path, self.fps, log=self._log)
            return self._recorder.path.name

    def stop(self) -> str | None:
        with self._lock:
            recorder, self._recorder = self._recorder, None
            if recorder is None:
                return None
            recorder.close()
            if recorder.frames_written == 0:
                return None
            self.finished.append(recorder.path.name)
            return recorder.path.name

    def write(self, frame: np.ndarray, now: float) -> None:
        with self._lock:
            if self._recorder is not None:
                self._recorder.write(frame, now)

    def close(self) -> None:
        self.stop()


class StudioServer:
    def __init__(self, control: LoopControl, display: DisplayStage, source: SwitchableSource, *,
                 host: str = "127.0.0.1", port: int = 0, title: str = "mlx-sdxs studio", save_dir: Path = Path("captures"),
                 log=None):
        self.control, self.display, self.source, self.title = control, display, source, title
        self.log = log if log is not None else sys.stderr
        self.token = secrets.token_urlsafe(24)
        self.broadcasts = {view: Broadcast(view) for view in ("ai", "camera", "display")}
        self.recordings = RecordingSink(Path(save_dir), source.fps, self.log)
        display.sinks.extend([*self.broadcasts.values(), self.recordings])
        self.backend = None
        self.dropped: Counter = Counter()
        self.note = ""
        self.viewers = 0
        self._closing = threading.Event()
        self.host = host
        self._socket = self._bind(host, port)
        self.port = self._socket.getsockname()[1]
        self._allowed_hosts = {f"{h}:{self.port}" for h in (*LOOPBACK, "[::1]", host)}
        self._server, self._thread = self._start()

    # --- lifecycle -----------------------------------------------------------------------------
    @staticmethod
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

    def _start(self):
        # No permessage-deflate: JPEGs do not compress, and zlib on every frame for every viewer cost 14× the
        # CPU of sending them (0.38 vs 0.027 cores for 20 viewers at 30 FPS), starving the model's threads.
        config = uvicorn.Config(self.app(), log_level="warning", ws_max_size=MAX_MESSAGE_BYTES, lifespan="off",
                                timeout_graceful_shutdown=2, ws_per_message_deflate=False)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [self._socket]}, name="sdxs-studio",
                                  daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)  # uvicorn signals readiness only through this flag
        if not server.started:
            raise SDXSError(f"the studio server did not start on {self.host}:{self.port}")
        return server, thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/?token={self.token}"

    def attach(self, backend) -> None:
        """The loop's backend, for the status (name, label) and the prompt-length check."""
        self.backend = backend

    def close(self) -> None:
        """Stop serving: viewers are released, the port is free when this returns."""
        if self._closing.is_set():
            return
        self._closing.set()
        for broadcast in self.broadcasts.values():
            broadcast.close()
        self._server.should_exit = True
        self._thread.join(5)
        self._socket.close()

    # --- status and controls ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        backend, display = self.backend, self.display
        recipe_prompts = getattr(backend, "prompts", (None, None))
        return {
            **self.control.stats.live(),
            "backend": getattr(backend, "name", ""), "label": display.label,
            "render_size": list(getattr(backend, "render_size", ())),
            "prompt": recipe_prompts[0], "prompt_b": recipe_prompts[1],
            "prompt_blend": getattr(backend, "prompt_blend", 0.0), "feedback": getattr(backend, "feedback", None),
            "seed_blend": getattr(getattr(backend, "settings", None), "seed_blend", None)
            if getattr(getattr(backend, "settings", None), "seed_b", None) is not None else None,
            "blend": display.blend, "ema": display.ema, "gallery": list(display.prompts or GALLERY),
            "source": self.source.current, "sources": self.source.choices,
            "frames_received": self._browser_received(), "dropped_messages": dict(self.dropped),
            "recording": self.recordings.active, "recordings": list(self.recordings.finished),
            "viewers": self.viewers, "note": self.note,
        }

    def _browser_received(self) -> int:
        browser = self.source.get("browser")
        return browser.received if isinstance(browser, BrowserSource) else 0

    def handle_control(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """One JSON control from the page; returns a reply to send back, if any."""
        kind = message.get("type")
        if kind == "prompt":
            return self._set_prompt(message)
        if kind == "settings":
            for knob in ("feedback", "prompt_blend", "seed_blend"):
                if knob in message:
                    if knob == "seed_blend" and self.status()["seed_blend"] is None:
                        continue  # no second random seed in this session
                    self.control.request(**{knob: check_fraction(message[knob], knob)})
            if "blend" in message:
                self.display.blend = check_fraction(message["blend"], "blend")
            if "ema" in message:
                self.display.ema = check_fraction(message["ema"], "ema", high=0.99)
            return None
        if kind == "source":
            try:
                self.source.switch(str(message.get("source")))
            except (SourceError, SDXSError) as exc:
                return {"type": "error", "message": str(exc)}
            return None
        if kind == "record":
            if message.get("action") == "start":
                return {"type": "recording", "started": self.recordings.start()}
            name = self.recordings.stop()
            return {"type": "recording", "finished": name, "url": f"/recordings/{name}" if name else None}
        raise ValueError(f"unknown control {kind!r}")

    def _set_prompt(self, message: dict[str, Any]) -> dict[str, Any]:
        changes = {}
        for key in ("prompt", "prompt_b"):
            if key in message:
                text = str(message[key])[:MAX_PROMPT_CHARS].strip()
                if key == "prompt" and not text:
                    raise ValueError("empty prompt")
                changes[key] = text
        if "prompt_blend" in message:
            changes["prompt_blend"] = check_fraction(message["prompt_blend"], "prompt_blend")
        notes = []
        engine = getattr(self.backend, "engine", None)
        for key, text in changes.items():
            if key in ("prompt", "prompt_b") and text and hasattr(engine, "prompt_truncated") and engine.prompt_truncated(text):
                notes.append(f"{'prompt B' if key == 'prompt_b' else 'prompt'} is longer than the text encoder's "
                             f"{MAX_LENGTH} tokens: the end was cut off")
        self.note = "; ".join(notes)
        self.control.request(**changes)
        return {"type": "prompt", "note": self.note}

    def accept_frame(self, data: bytes) -> bool:
        """A JPEG from the page's webcam, checked before decoding; False (and counted) when dropped."""
        reason = None
        if len(data) > MAX_FRAME_BYTES:
            reason = "too large"
        else:
            size = header_size(data[:65536])
            if size is None:
                reason = "not a JPEG/PNG"
            elif size[0] * size[1] > MAX_FRAME_PIXELS or min(size) < MIN_SIDE:
                reason = "bad size"
        frame = None
        if reason is None:
            frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if frame is None or frame.ndim != 3:
                reason = "undecodable"
        if reason is not None:
            self.dropped[reason] += 1
            return False
        browser = self.source.get("browser")
        if isinstance(browser, BrowserSource):
            browser.push(frame)
        return True

    # --- the ASGI app ----------------------------------------------------------------------------
    def _authorised(self, request) -> int:
        """0 when the request may proceed, else the HTTP status to refuse it with (401 no token, 403 wrong)."""
        if request.headers.get("host", "") not in self._allowed_hosts:
            return 403  # a foreign Host: DNS rebinding
        given = request.query_params.get("token") or request.cookies.get(COOKIE)
        if not given:
            return 401
        return 0 if secrets.compare_digest(given, self.token) else 403

    def _origin_ok(self, websocket) -> bool:
        origin = websocket.headers.get("origin")
        return origin is None or origin in {f"http://{h}" for h in self._allowed_hosts}

    def app(self) -> Starlette:
        static = resources.files("mlx_sdxs.studio") / "static"
        server = self

        def guarded(handler):
            async def endpoint(request):
                refused = server._authorised(request)
                if refused:
                    text = "token required: open the URL the server printed" if refused == 401 else "forbidden"
                    return PlainTextResponse(text, status_code=refused)
                response = await handler(request)
                if request.query_params.get("token"):
                    response.set_cookie(COOKIE, server.token, httponly=True, samesite="strict")
                return response

            return endpoint

        async def page(request):
            html = (static / "index.html").read_text().replace("{{TITLE}}", server.title)
            return Response(html, media_type="text/html", headers={"Cache-Control": "no-store"})

        async def asset(request):
            name = request.path_params["name"]
            if name not in ("app.js", "app.css"):
                return PlainTextResponse("not found", status_code=404)
            kind = "text/javascript" if name.endswith(".js") else "text/css"
            return Response((static / name).read_text(), media_type=kind)

        async def status(request):
            return JSONResponse(server.status())

        async def frame(request):
            latest = await server.broadcasts["display"].next_async(0, 5)
            if latest is None:
                return PlainTextResponse("no frame yet", status_code=503)
            return Response(latest[1], media_type="image/jpeg", headers={"Cache-Control": "no-store"})

        async def snapshot(request):
            shown = server.broadcasts["ai"].latest_frame()
            if shown is None:
                return PlainTextResponse("no frame yet", status_code=503)
            ok, png = cv2.imencode(".png", shown)
            return Response(png.tobytes(), media_type="image/png",
                            headers={"Content-Disposition": f'attachment; filename="mlx-sdxs-{datetime.now():%H%M%S}.png"'})

        async def mjpeg(request):
            async def parts():
                seq = 0
                while not server._closing.is_set():
                    latest = await server.broadcasts["display"].next_async(seq, 0.5)
                    if latest is None:
                        continue
                    seq, jpeg = latest
                    yield (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                           .encode() + jpeg + b"\r\n")

            return StreamingResponse(parts(), media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                                     headers={"Cache-Control": "no-store"})

        async def recording(request):
            name = request.path_params["name"]
            if name not in server.recordings.finished:
                return PlainTextResponse("no such recording", status_code=404)
            return FileResponse(server.recordings.folder / name, media_type="video/mp4")

        async def websocket_endpoint(websocket):
            if server._authorised(websocket) or not server._origin_ok(websocket):
                await websocket.close(code=1008)  # before accept: the handshake is refused with 403
                return
            await websocket.accept()
            server.viewers += 1
            try:
                await server._serve_viewer(websocket)
            finally:
                server.viewers -= 1

        routes = [Route("/", guarded(page)), Route("/static/{name}", guarded(asset)),
                  Route("/api/status", guarded(status)), Route("/frame.jpg", guarded(frame)),
                  Route("/snapshot.png", guarded(snapshot)), Route("/stream.mjpg", guarded(mjpeg)),
                  Route("/recordings/{name}", guarded(recording)), WebSocketRoute("/ws", websocket_endpoint)]
        return Starlette(routes=routes)

    async def _serve_viewer(self, websocket) -> None:
        """Two tasks per viewer: one receives (frames and controls), one sends the newest frames and status."""
        async def receive():
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    await asyncio.to_thread(self.accept_frame, message["bytes"])
                    continue
                try:
                    reply = self.handle_control(json.loads(message.get("text") or ""))
                except (SDXSError, ValueError, TypeError, AttributeError, json.JSONDecodeError):
                    self.dropped["bad control"] += 1
                    continue
                if reply is not None:
                    await websocket.send_text(json.dumps(reply))

        async def send():
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

        tasks = [asyncio.ensure_future(receive()), asyncio.ensure_future(send())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except WebSocketDisconnect:
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


"""`mlx-sdxs studio` as a client sees it: a real server process on the random-tiny model, driven over HTTP
and the WebSocket (the browser test drives the page itself: test_studio_browser.py).

Checked: every route and the WebSocket need the token (401 without, 403 wrong); a foreign Origin or Host
is refused; a 50 MB, a garbage and a wrong-type message are dropped and counted while the stream goes
on; frames sent in come back transformed; long prompts are truncated with a note; snapshots, MJPEG,
recordings; SIGTERM stops it cleanly and frees the port.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

pytestmark = pytest.mark.policy_independent  # see pyproject.toml

pytest.importorskip("starlette", reason="the studio extra is not installed")
websockets = pytest.importorskip("websockets", reason="the studio extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
URL_LINE = re.compile(r"studio at (https?)://[^/]+:(\d+)/\?token=([\w-]+)")
HOST_LINE = re.compile(r"host controls: https?://\S+\?token=([\w-]+)")


class Studio:
    """A studio process: `token` is the visitors' (the printed URL), `host_token` the host's; `context`: the SSL
    context a client trusts its certificate with (set by the HTTPS tests)."""

    def __init__(self, tmp: Path, *extra: str, env: dict | None = None):
        command = [sys.executable, "-m", "mlx_sdxs.cli", "studio", "--model", "random-tiny", "--port", "0",
                   "--render-size", "128", "--save-dir", str(tmp / "captures"), "--similarity-threshold", "0", *extra]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.log, self.context = [], None
        for line in self.process.stderr:  # the URLs are printed before the model warms up, the host's last
            self.log.append(line)
            if match := URL_LINE.search(line):
                self.scheme, self.port, self.token = match.group(1), int(match.group(2)), match.group(3)
                self.base = f"{self.scheme}://127.0.0.1:{self.port}"
            if match := HOST_LINE.search(line):
                self.host_token = match.group(1)
                return
        raise AssertionError("studio printed no URL:\n" + "".join(self.log))

    def get(self, path: str, token: str | None = "", headers: dict | None = None):
        token = self.token if token == "" else token
        sep = "&" if "?" in path else "?"
        url = self.base + path + (f"{sep}token={token}" if token else "")
        request = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=15, context=self.context) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()

    def ws_url(self, token: str | None = "") -> str:
        scheme = "wss" if self.scheme == "https" else "ws"
        query = f"?token={self.token if token == '' else token}" if token is not None else ""
        return f"{scheme}://127.0.0.1:{self.port}/ws{query}"

    def stop(self) -> tuple[int, str, str]:
        self.process.send_signal(signal.SIGTERM)
        out, err = self.process.communicate(timeout=60)
        return self.process.returncode, out, "".join(self.log) + err


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    server = Studio(tmp_path_factory.mktemp("studio"), "--source", "synthetic")
    yield server
    if server.process.poll() is None:
        server.stop()


def _jpeg(value: int, size=(96, 128)) -> bytes:
    frame = np.zeros((*size, 3), np.uint8)
    frame[:, :, 1] = value
    frame[::8] = 255 - value
    return cv2.imencode(".jpg", frame)[1].tobytes()


def _matching_status(message, predicate) -> dict | None:
    """The status in a WebSocket message, if it is one and `predicate` accepts it."""
    if isinstance(message, str):
        data = json.loads(message)
        if data.get("type") == "status" and predicate(data):
            return data
    return None


async def _status(ws, predicate, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _matching_status(await asyncio.wait_for(ws.recv(), timeout), predicate)
        if status is not None:
            return status
    raise AssertionError("status never matched")


@pytest.mark.timeout(120)
def test_every_route_needs_the_token(studio):
    for path in ("/", "/static/app.js", "/api/status", "/frame.jpg", "/snapshot.png", "/stream.mjpg",
                 "/recordings/x.mp4"):
        assert studio.get(path, token=None)[0] == 401, path
        assert studio.get(path, token="wrong")[0] == 403, path
    status, headers, body = studio.get("/")
    assert status == 200 and b"<title>mlx-sdxs studio</title>" in body
    assert "mlx_sdxs_token=" in headers["set-cookie"] and "httponly" in headers["set-cookie"].lower()
    # The cookie alone is enough afterwards (the page's scripts and its WebSocket carry it).
    cookie = headers["set-cookie"].split(";")[0]
    assert studio.get("/static/app.js", token=None, headers={"Cookie": cookie})[0] == 200
    assert studio.get("/", headers={"Host": "attacker.example"})[0] == 403  # DNS rebinding


@pytest.mark.timeout(120)
def test_websocket_refuses_no_token_a_wrong_token_and_a_foreign_origin(studio):
    async def attempt(url, **kwargs):
        try:
            async with websockets.connect(url, **kwargs) as ws:
                await ws.recv()
                return "accepted"
        except websockets.exceptions.InvalidStatus as exc:
            return exc.response.status_code

    assert asyncio.run(attempt(studio.ws_url(token=None))) == 403
    assert asyncio.run(attempt(studio.ws_url(token="wrong"))) == 403
    assert asyncio.run(attempt(studio.ws_url(), origin="http://evil.example")) == 403
    assert asyncio.run(attempt(studio.ws_url(), origin=f"http://127.0.0.1:{studio.port}")) == "accepted"


@pytest.mark.timeout(180)
def test_webcam_frames_come_back_and_bad_messages_are_dropped_and_counted(studio):
    async def session():
        async with websockets.connect(studio.ws_url(), max_size=2**24) as ws:
            await ws.send(json.dumps({"type": "source", "source": "browser"}))
            await _status(ws, lambda s: s["source"] == "browser")
            await ws.send(b"\x00" * (50 << 20))  # 50 MB
            await ws.send(b"garbage, not an image")
            await ws.send(b"\xff\xd8\xff\xe0" + b"\x00" * 100)  # a JPEG start, then nothing decodable
            await ws.send("this is not JSON")  # wrong type of text message
            # A webcam keeps sending, and the server only infers frames newer than the last one it read: so the
            # client sends until it has what it waits for, and collects AI frames while it waits for the status.
            outputs, status = [], None

            async def webcam():
                for step in itertools.count():
                    await ws.send(_jpeg(40 + 10 * (step % 20)))
                    await asyncio.sleep(0.05)

            async def collect():
                nonlocal status
                while status is None or len(outputs) < 3:
                    message = await ws.recv()
                    if isinstance(message, bytes) and message[:1] == b"\x01":
                        outputs.append(cv2.imdecode(np.frombuffer(message[1:], np.uint8), cv2.IMREAD_COLOR))
                    status = status or _matching_status(
                        message, lambda s: s["frames_received"] >= 10 and s["inferred"] > 0)

            sender = asyncio.ensure_future(webcam())
            try:
                await asyncio.wait_for(collect(), 120)
            finally:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            return status, outputs

    status, outputs = asyncio.run(session())
    dropped = status["dropped_messages"]
    # garbage, and a JPEG marker with no frame header behind it, are both refused before decoding
    assert dropped == {"too large": 1, "not a JPEG/PNG": 2, "bad control": 1}
    assert all(o.shape == (128, 128, 3) for o in outputs)
    assert studio.process.poll() is None  # still serving


@pytest.mark.timeout(180)
def test_prompt_settings_snapshot_mjpeg_and_recording(studio):
    async def session():  # as the host: recording and the server's sources are the host's
        async with websockets.connect(studio.ws_url(token=studio.host_token)) as ws:
            await ws.send(json.dumps({"type": "source", "source": "synthetic"}))
            await ws.send(json.dumps({"type": "prompt", "prompt": "a pencil sketch"}))
            await _status(ws, lambda s: s["prompt"] == "a pencil sketch" and s["inferred"] > 0)
            await ws.send(json.dumps({"type": "prompt", "prompt": "very " * 120 + "long"}))
            reply = await _status(ws, lambda s: s["prompt"].startswith("very very"))
            await ws.send(json.dumps({"type": "settings", "feedback": 0.4, "blend": 0.3, "ema": 0.2}))
            settled = await _status(ws, lambda s: s["feedback"] == 0.4 and s["blend"] == 0.3)
            await ws.send(json.dumps({"type": "record", "action": "start"}))
            started = await _status(ws, lambda s: s["recording"])
            await _status(ws, lambda s: s["displayed"] >= started["displayed"] + 10)  # ten frames on record
            await ws.send(json.dumps({"type": "record", "action": "stop"}))
            while True:
                message = await ws.recv()
                if isinstance(message, str) and json.loads(message)["type"] == "recording":
                    return reply, settled, json.loads(message)

    note, settled, recording = asyncio.run(session())
    assert "longer than the text encoder's 77 tokens" in note["note"]
    assert settled["ema"] == 0.2
    status, headers, png = studio.get("/snapshot.png")
    assert status == 200 and headers["content-type"] == "image/png"
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).shape == (128, 128, 3)
    status, headers, jpeg = studio.get("/frame.jpg")
    assert status == 200 and cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR) is not None
    assert recording["url"].startswith("/recordings/mlx-sdxs-") and recording["url"].endswith(".mp4")
    status, headers, video = studio.get(recording["url"], token=studio.host_token)
    assert status == 200 and headers["content-type"] == "video/mp4" and len(video) > 1000
    with urllib.request.urlopen(f"{studio.base}/stream.mjpg?token={studio.token}", timeout=15) as stream:
        assert stream.headers["Content-Type"].startswith("multipart/x-mixed-replace")
        assert stream.readline().startswith(b"--")


@pytest.mark.timeout(120)
def test_sigterm_stops_the_studio_and_frees_the_port(tmp_path):
    studio = Studio(tmp_path)
    code, out, err = studio.stop()
    assert code == 130 and "terminated (SIGTERM)" in err and "Traceback" not in err
    with socket.socket() as probe:  # the port is free again
        probe.bind(("127.0.0.1", studio.port))


@pytest.mark.timeout(180)
def test_twenty_viewers_leave_no_threads_fds_or_memory_behind(tmp_path):
    """Structure, not speed (bench/studio_load.py measures the AI FPS): 20 viewers, one of them never reading,
    then everyone leaves — the server's threads and file descriptors are back where they were."""
    import psutil

    studio = Studio(tmp_path, "--source", "synthetic")
    process = psutil.Process(studio.process.pid)

    def status() -> dict:
        return json.loads(studio.get("/api/status")[2])

    async def crowd():
        # Host pages: each watches (and steers) the host's stream; a visitor's page would get a stream of its own.
        viewers = [await websockets.connect(studio.ws_url(token=studio.host_token), max_size=2**24, ping_interval=None,
                                            close_timeout=1) for _ in range(20)]
        for ws in viewers[1:]:
            for _ in range(20):  # each reads a few frames; viewers[0] reads nothing at all
                await ws.recv()
        during = await asyncio.to_thread(status)
        for ws in viewers:
            await ws.close()
        return during

    try:
        first = _wait_for_status(status, lambda s: s["inferred"] > 0)
        threads, fds, rss = process.num_threads(), process.num_fds(), process.memory_info().rss
        during = asyncio.run(crowd())
        assert during["viewers"] == 20
        after = _wait_for_status(status, lambda s: s["viewers"] == 0 and s["inferred"] > during["inferred"])
        assert after["inferred"] > first["inferred"]  # the loop kept running with a stuck viewer
        # The server closes a socket just after its handler returns (our status request's too): give it a moment.
        deadline = time.monotonic() + 10
        while (process.num_threads() > threads or process.num_fds() > fds) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.num_threads() <= threads and process.num_fds() <= fds
        assert process.memory_info().rss - rss < 100 << 20
    finally:
        studio.stop()


def _wait_for_status(read, predicate, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = read()
        if predicate(status):
            return status
        time.sleep(0.2)  # another process's state: poll its status route
    raise AssertionError("status never matched")


@pytest.mark.timeout(60)
def test_camera_runs_without_the_studio_extra_and_says_what_the_preview_needs(tmp_path):
    """`camera` keeps working when starlette/uvicorn are not installed; --preview-port then says what is missing."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['starlette'] = None\nsys.modules['uvicorn'] = None\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    base = [sys.executable, "-m", "mlx_sdxs.cli", "camera", "--model", "random-tiny", "--source", "synthetic",
            "--headless", "--render-size", "128", "--max-frames", "2"]
    plain = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=50)
    assert plain.returncode == 0, plain.stderr
    preview = subprocess.run([*base, "--preview-port", "0"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=50)
    assert preview.returncode == 1 and "pip install 'mlx-sdxs[studio]'" in preview.stderr
    assert "Traceback" not in preview.stderr


@pytest.mark.timeout(60)
def test_a_host_other_than_loopback_gets_a_warning(tmp_path):
    studio = Studio(tmp_path, "--host", "0.0.0.0", env={"MLX_SDXS_CACHE": str(tmp_path / "cache")})
    try:
        assert any("warning: listening on 0.0.0.0" in line for line in studio.log)
        assert studio.scheme == "https"  # for the webcam of visitors on other devices
    finally:
        studio.stop()

"""One stream per studio visitor: two visitors' webcams and prompts never mix (each AI view a visitor receives
shows its own webcam through the camera blend, and its status its own prompt), and a visitor past
--max-streams waits in line, told its place, receiving no one's frames — then gets a stream of its own when one
leaves. (That a stream's pixels are what it gets alone is tests/test_batch's: here the random model's output
hardly depends on its input, so the blend is what names the webcam.)"""

from __future__ import annotations

import asyncio
import json
import time

import cv2
import numpy as np
import pytest
from test_studio import Studio


pytestmark = pytest.mark.policy_independent  # see pyproject.toml
websockets = pytest.importorskip("websockets", reason="the studio extra is not installed")

#: Rows compared: above the RANDOM WEIGHTS band drawn across the bottom of every AI view.
TOP = 80
VISITORS = {"A": ((0, 0, 230), "a red fox"), "B": ((230, 0, 0), "a blue whale")}


def _webcam(bgr: tuple[int, int, int]) -> bytes:
    frame = np.zeros((96, 128, 3), np.uint8)
    frame[:] = bgr
    frame[::16] = 255  # some structure for the encoder
    return cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def _made_from(jpeg: bytes) -> str:
    """Whose webcam an AI view shows through its camera blend (0.5): A's is red, B's blue; the random model's half
    is noise-like grey, so the blended colour names the webcam."""
    blue, _, red = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[:TOP].reshape(-1, 3).mean(axis=0)
    return "A" if red > blue + 40 else "B" if blue > red + 40 else "?"


async def _messages(ws, seconds: float, on_status=None):
    """(AI frames, status messages, line messages) received for `seconds`."""
    frames, statuses, lines = [], [], []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = await asyncio.wait_for(ws.recv(), left)
        except asyncio.TimeoutError:
            break
        if isinstance(message, bytes):
            if message[:1] == b"\x01":
                frames.append(message[1:])
            continue
        data = json.loads(message)
        if data["type"] == "status":
            statuses.append(data)
        elif data["type"] == "line":
            lines.append(data)
    return frames, statuses, lines


async def _visit(studio: Studio, name: str, seconds: float, started: asyncio.Event):
    bgr, prompt = VISITORS[name]
    async with websockets.connect(studio.ws_url()) as ws:
        await ws.send(json.dumps({"type": "prompt", "prompt": prompt}))
        await ws.send(json.dumps({"type": "settings", "ema": 0.0, "blend": 0.5, "similarity_threshold": 0.0}))
        while True:  # the prompt and settings are this stream's before its first frame
            message = await ws.recv()
            data = json.loads(message) if isinstance(message, str) else {}
            if data.get("type") == "status" and data["prompt"] == prompt and data["blend"] == 0.5:
                break
        started.set()
        webcam = _webcam(bgr)

        async def send_frames():
            for _ in range(int(seconds * 10)):
                await ws.send(webcam)
                await asyncio.sleep(0.1)  # a webcam's pace: ~10 frames a second

        sender = asyncio.ensure_future(send_frames())
        frames, statuses, _ = await _messages(ws, seconds)
        await sender
        return frames, statuses


@pytest.mark.timeout(300)
def test_two_visitors_get_their_own_streams_and_a_third_waits_in_line(tmp_path):
    studio = Studio(tmp_path, "--max-streams", "2")
    try:
        async def scene():
            started = {name: asyncio.Event() for name in VISITORS}
            visits = {name: asyncio.ensure_future(_visit(studio, name, 20, started[name])) for name in VISITORS}
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started.values())), 120)
            async with websockets.connect(studio.ws_url()) as third:  # a third visitor, over --max-streams 2
                await third.send(_webcam((0, 230, 0)))
                frames, statuses, lines = await _messages(third, 5)
                assert not frames and not statuses, "a visitor in line received frames or a stream's status"
                assert lines and lines[-1]["place"] == 1 and lines[-1]["max_streams"] == 2
            results = {name: await visit for name, visit in visits.items()}
            # A leaves: a visitor now in line gets its stream at once.
            async with websockets.connect(studio.ws_url()) as fourth:
                _, statuses, lines = await _messages(fourth, 10)
            # How many stream at once is the host's to change, live; a visitor asking is refused.
            async with websockets.connect(studio.ws_url()) as visitor:
                await visitor.send(json.dumps({"type": "max_streams", "value": 5}))
                refusal = {}
                while refusal.get("type") != "error":
                    message = await asyncio.wait_for(visitor.recv(), 30)
                    refusal = json.loads(message) if isinstance(message, str) else {}
                assert "only the host" in refusal["message"]
            async with websockets.connect(studio.ws_url(token=studio.host_token)) as host:
                await host.send(json.dumps({"type": "max_streams", "value": 3}))
                _, host_statuses, _ = await _messages(host, 2)
            assert host_statuses[-1]["max_streams"] == 3 and host_statuses[-1]["stream"] == "host"
            return results, statuses, lines

        results, fourth_statuses, fourth_lines = asyncio.run(scene())
        for name, (frames, statuses) in results.items():
            assert len(frames) >= 10, f"visitor {name} received {len(frames)} AI frames"
            assert statuses[-1]["inferred"] >= 5, f"visitor {name}'s stream ran {statuses[-1]['inferred']} frames"
            made = [_made_from(jpeg) for jpeg in frames]
            share = made.count(name) / len(made)
            assert share >= 0.95, f"visitor {name}: {share:.0%} of its AI frames are its own ({made})"
            assert all(status["prompt"] == VISITORS[name][1] for status in statuses), f"{name} saw another prompt"
            assert all(status["stream"] == "own" for status in statuses)
        assert fourth_statuses and fourth_statuses[-1]["stream"] == "own", (fourth_statuses[-1:], fourth_lines[-1:])
    finally:
        code, _, err = studio.stop()
    assert code == 130, err
    assert "Traceback" not in err

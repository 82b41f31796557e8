"""OSC control (`--osc-port`): a running studio takes knob messages from a python-osc client, answers
/sdxs/status, and counts and drops what is not a knob message while the session goes on."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest

pytest.importorskip("pythonosc", reason="python-osc is not installed (the osc extra)")
from pythonosc.osc_message import OscMessage  # noqa: E402
from pythonosc.udp_client import SimpleUDPClient  # noqa: E402
from test_studio import Studio  # noqa: E402

from mlx_sdxs.knobs import KNOBS  # noqa: E402

pytestmark = pytest.mark.policy_independent  # see pyproject.toml
OSC_LINE = re.compile(r"OSC on udp 127\.0\.0\.1:(\d+)")


def _status(studio: Studio) -> dict:
    code, _, body = studio.get("/api/status")
    assert code == 200
    return json.loads(body)


def _until(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)  # another process's state: poll its status route
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(180)
def test_osc_messages_turn_knobs_of_a_running_studio_and_bad_ones_are_counted(tmp_path):
    studio = Studio(tmp_path, "--source", "synthetic", "--osc-port", "0")
    try:
        port = _osc_port(studio)
        code, _, body = studio.get("/api/knobs")
        assert code == 200 and [k["name"] for k in json.loads(body)] == list(KNOBS)
        _until(lambda: _status(studio)["inferred"] > 0, "the first frames")

        client = SimpleUDPClient("127.0.0.1", port)
        client.send_message("/sdxs/prompt", "a red fox")
        client.send_message("/sdxs/ema", 0.5)
        client.send_message("/sdxs/similarity_threshold", 2)  # an int where a float is expected is fine
        status = _until(lambda: (lambda s: s if s["prompt"] == "a red fox" and s["ema"] == 0.5 else None)(_status(studio)),
                        "the OSC knobs in /api/status")
        assert status["similarity_threshold"] == 2.0

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.settimeout(10)
            for junk in (b"not an OSC message", b"/sdxs/ema\x00\x00\x00,f\x00", ):
                raw.sendto(junk, ("127.0.0.1", port))  # not OSC, and a truncated message
            client.send_message("/sdxs/ema", 7.0)  # out of range
            client.send_message("/sdxs/ema", [0.1, 0.2])  # two arguments
            client.send_message("/sdxs/warp_speed", 1.0)  # no such knob
            inferred = _status(studio)["inferred"]
            _until(lambda: _status(studio)["inferred"] > inferred, "frames after the bad messages")  # it goes on
            raw.sendto(_message("/sdxs/status"), ("127.0.0.1", port))
            replies = {}
            while "osc_dropped" not in replies:
                message = OscMessage(raw.recvfrom(65535)[0])
                replies[message.address.removeprefix("/sdxs/")] = message.params[0]
        assert replies["osc_dropped"] == 5
        assert replies["prompt"] == "a red fox" and replies["ema"] == pytest.approx(0.5)
        assert _status(studio)["ema"] == 0.5  # the bad values changed nothing
        assert "ai_fps" in replies and "control_strength" not in replies  # no ControlNet in random-tiny
    finally:
        code, _, err = studio.stop()
    assert code == 130, err
    assert "Traceback" not in err


def _osc_port(studio: Studio) -> int:
    """The port the studio printed (after its URL: the OSC hook is attached after the server's)."""
    for line in studio.log:
        if OSC_LINE.search(line):
            return int(OSC_LINE.search(line).group(1))
    for line in studio.process.stderr:
        studio.log.append(line)
        if OSC_LINE.search(line):
            return int(OSC_LINE.search(line).group(1))
    raise AssertionError("no OSC port line:\n" + "".join(studio.log))


def _message(address: str) -> bytes:
    from pythonosc.osc_message_builder import OscMessageBuilder

    return OscMessageBuilder(address).build().dgram

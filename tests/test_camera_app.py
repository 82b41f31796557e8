"""`run_camera`: flags, exit statuses, error reporting, Ctrl-C/SIGTERM/quit finalising outputs, headless."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_backend import CountingSource, FakeBackend, count_video_frames, ctrl_c_after_frames, no_leaked_threads  # noqa: F401

from mlx_sdxs.camera.app import run_camera
from mlx_sdxs.camera.loop import run_loop
from mlx_sdxs.camera.outputs import VideoRecorder
from mlx_sdxs.camera.presenter import Presenter
from mlx_sdxs.camera.session import default_render_size
from mlx_sdxs import runtime
from mlx_sdxs.cli import build_parser

pytestmark = pytest.mark.policy_independent  # see pyproject.toml

ROOT = Path(__file__).resolve().parents[1]


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["camera", *argv])


HEADLESS = ("--source", "synthetic", "--capture-size", "161x121", "--fps", "200", "--headless",
            "--render-size", "128", "--output-size", "64")


def test_flags_defaults_and_validation(capsys):
    args = parse()
    assert (args.source, args.render_size, args.ema, args.blend, args.feedback) == (None, None, 0.4, 0.0, 0.1)
    assert args.window and args.similarity_threshold > 0 and args.loop and args.backend == "mlx"
    assert parse("--camera", "1", "--render-size", "320", "--no-loop").source == "1"
    assert parse("--render-size", "512x384").render_size == (512, 384)
    assert parse("--render-size", "320").render_size == (320, 320)
    for bad, message in ((("--render-size", "300"), "sides must be multiples of 64 in [64, 2048]"),
                         (("--render-size", "4096"), "--render-size must be in [64, 2048]"),
                         (("--ema", "0.97"), "--ema must be in [0.0, 0.95]"),
                         (("--similarity-threshold", "nan"), "--similarity-threshold must be in [0.0, 255.0]"),
                         (("--render-size", "512x"), "--render-size must be an integer"),
                         (("--blend", "1.5"), "--blend must be in [0.0, 1.0]"),
                         (("--kernels", "fast"), "invalid choice: 'fast'"),
                         (("--capture-size", "640"), "--capture-size must look like 640x480")):
        with pytest.raises(SystemExit):
            parse(*bad)
        assert message in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_headless_session_records_and_reports(tmp_path, capsys):
    backends = []

    def make_backend(args):
        assert args.prompt == "a fox" and args.render_size == (128, 128) and args.feedback == 0.2
        backends.append(FakeBackend(render_size=args.render_size, label="RANDOM WEIGHTS - not a trained model"))
        return backends[0]

    record = tmp_path / "session.mp4"
    status = run_camera(parse(*HEADLESS, "--prompt", "a fox", "--feedback", "0.2", "--max-frames", "5",
                              "--record", str(record), "--frames-dir", str(tmp_path / "frames")), make_backend)
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "displayed 5" in out and "latency p50" in out and "AI " in out and "display " in out
    assert count_video_frames(record) >= 1 and len(list((tmp_path / "frames").glob("*.png"))) == 5
    assert backends[0].closed and backends[0].warmed and backends[0].prompts == ["a fox"]
    assert backends[0].threads == {"sdxs-inference"}


@pytest.mark.timeout(30)
def test_backend_failure_stops_within_two_seconds_with_the_error(tmp_path, capsys):
    backend = FakeBackend(render_size=128, fail_at=4)
    record = tmp_path / "crash.mp4"
    status = run_camera(parse(*HEADLESS, "--record", str(record)), lambda args: backend)
    returned = time.perf_counter()
    err = capsys.readouterr().err
    assert status == 1
    assert returned - backend.failed_at < 2.0
    assert "error: inference thread failed at frame" in err and "RuntimeError: fake failure at call 4" in err
    assert "Traceback" not in err
    assert count_video_frames(record) >= 1 and not list(tmp_path.glob(".*partial*"))  # finalised on the error path
    assert backend.closed


@pytest.mark.timeout(30)
def test_ctrl_c_finalises_the_video(tmp_path, capsys):
    frames = tmp_path / "frames"
    backend = FakeBackend(render_size=128, cost_s=0.005, on_frame=ctrl_c_after_frames(frames))
    record = tmp_path / "interrupted.mp4"
    status = run_camera(parse(*HEADLESS, "--record", str(record), "--frames-dir", str(frames),
                              "--similarity-threshold", "0"), lambda args: backend)
    out, err = capsys.readouterr()
    assert status == 130 and "interrupted" in err and "(interrupted)" in out
    assert count_video_frames(record) >= 1 and not list(tmp_path.glob(".*partial*"))
    assert backend.closed


class KeyWindow:
    """An OpenCV-window stand-in that presses `key` at the n-th poll."""

    def __init__(self, key: str, at: int):
        self.key, self.at, self.polls, self.shown, self.closed = ord(key), at, 0, 0, False

    def show(self, frame):
        self.shown += 1

    def poll_key(self) -> int:
        self.polls += 1
        return self.key if self.polls == self.at else -1

    def close(self):
        self.closed = True


@pytest.mark.timeout(30)
def test_quit_key_finalises_the_video(tmp_path):
    record = tmp_path / "quit.mp4"
    window = KeyWindow("q", at=4)
    display = Presenter(output_size=64, window=window, sinks=[VideoRecorder(record, fps=30)])
    try:
        stats = run_loop(CountingSource(fps=200), FakeBackend(), display)
    finally:
        display.close()
    assert stats.stop_reason == "quit" and window.closed and window.shown >= 1
    assert count_video_frames(record) >= 1


@pytest.mark.timeout(30)
def test_no_display_falls_back_to_headless_and_says_so(monkeypatch, capsys):
    monkeypatch.setattr("mlx_sdxs.camera.session.display_available", lambda: False)
    argv = [a for a in HEADLESS if a != "--headless"]
    status = run_camera(parse(*argv, "--max-frames", "3"), lambda args: FakeBackend(render_size=128))
    err = capsys.readouterr().err
    assert status == 0
    assert err.count("no display available") == 1 and "mlx-sdxs studio" in err


def test_default_render_size_follows_the_device_and_backend():
    if runtime.on_gpu():
        assert default_render_size(parse()) == (512, 512)
    else:  # MLX on a CPU manages ~4× more frames at 256; the comparison backends run the trained 512
        assert default_render_size(parse()) == (256, 256)
    assert default_render_size(parse("--backend", "torch")) == (512, 512)


def test_bad_prompt_file_and_bad_video_exit_1_naming_the_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"fine\n\xff\xfe broken\n")

    def never(args):
        raise AssertionError("the backend must not be built")

    assert run_camera(parse(*HEADLESS, "--prompts", str(prompts)), never) == 1
    assert f"--prompts {prompts}, line 2: not valid UTF-8" in capsys.readouterr().err
    video = tmp_path / "broken.mp4"
    video.write_bytes(b"not a video")
    args = parse(*HEADLESS)
    args.source = str(video)
    assert run_camera(args, never) == 1
    assert f"video file {video} cannot be read" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_sigterm_during_a_recording_leaves_a_playable_mp4(tmp_path):
    """SIGTERM is a stop like Ctrl-C: threads joined, the recording finalised under its name, stats printed."""
    video = tmp_path / "out.mp4"
    command = [sys.executable, "-m", "mlx_sdxs.cli", "camera", "--model", "random-tiny", "--source", "synthetic",
               "--headless", "--render-size", "192x128", "--record", str(video), "--similarity-threshold", "0"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stderr:  # wait until frames flow, then stop it the way a service manager does
        if "warming up" in line:
            break
    partial = tmp_path / ".out.partial.mp4"
    deadline = time.monotonic() + 60
    # Another process's file has no event to wait on: poll until its first 1-s fragment is on disk.
    while time.monotonic() < deadline and not (partial.is_file() and partial.stat().st_size > 4096):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "terminated (SIGTERM)" in err and "(interrupted)" in out
    assert video.is_file() and not list(tmp_path.glob(".*partial*"))
    assert count_video_frames(video) >= 5

"""Frame sources: synthetic scene, camera with reconnects (fake capture), video files, `open_source`."""

from __future__ import annotations

import io
import threading

import cv2
import numpy as np
import pytest
from fake_backend import FakeBackend, no_leaked_threads  # noqa: F401 (autouse fixture)

from mlx_sdxs.camera.loop import run_loop
from mlx_sdxs.camera.sources import CameraSource, SyntheticSource, VideoFileSource, open_source, validate_frame
from mlx_sdxs.errors import ImageError, SourceError

pytestmark = pytest.mark.policy_independent  # see pyproject.toml


def _mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


def test_synthetic_scene_moves_and_is_deterministic():
    first = SyntheticSource(160, 120, fps=0, seed=3).read()
    a, b = SyntheticSource(160, 120, fps=0, seed=3), SyntheticSource(160, 120, fps=0, seed=3)
    frames_a = [a.read() for _ in range(5)]
    frames_b = [b.read() for _ in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(frames_a, frames_b))
    assert np.array_equal(first, frames_a[0]) and np.array_equal(a.render(2), frames_a[2])
    assert all(_mean_diff(x, y) > 0.5 for x, y in zip(frames_a, frames_a[1:])), "consecutive frames must differ"
    assert _mean_diff(SyntheticSource(160, 120, seed=4).render(0), frames_a[0]) > 5
    assert frames_a[0].shape == (120, 160, 3) and frames_a[0].dtype == np.uint8


def test_synthetic_pans_and_zooms_an_image(tmp_path):
    y, x = np.mgrid[0:90, 0:120]
    picture = np.stack([x * 2, y * 2, ((x // 10 + y // 10) % 2) * 255], axis=-1).astype(np.uint8)
    path = tmp_path / "picture.png"
    cv2.imwrite(str(path), picture)
    source = open_source(f"synthetic:{path}", size=(121, 91), fps=0)
    frames = [source.read() for _ in range(3)]
    assert source.name == f"synthetic:{path}" and frames[0].shape == (91, 121, 3)
    assert _mean_diff(frames[0], frames[2]) > 0.2 and _mean_diff(frames[0], source.render(30)) > 2
    with pytest.raises(SourceError, match="missing.png"):
        open_source(f"synthetic:{tmp_path / 'missing.png'}")


def test_synthetic_refuses_tiny_sizes_and_stops_on_request():
    with pytest.raises(SourceError, match=r"1×1 is too small"):
        SyntheticSource(1, 1)
    stop = threading.Event()
    stop.set()
    assert SyntheticSource(64, 64, fps=5).read(stop) is None


def test_validate_frame_names_the_source():
    with pytest.raises(ImageError, match=r"camera 2 delivered a 1×1 frame"):
        validate_frame(np.zeros((1, 1, 3), np.uint8), "camera 2")
    with pytest.raises(ImageError, match=r"expected uint8 H×W×3"):
        validate_frame(np.zeros((20, 20), np.uint8), "camera 2")
    assert validate_frame(np.zeros((479, 641, 3), np.uint8), "x").shape == (479, 641, 3)


class FakeCapture:
    """cv2.VideoCapture stand-in: `frames` good reads, then failures."""

    def __init__(self, opened: bool = True, frames: int = 0):
        self.opened, self.remaining, self.props, self.released = opened, frames, {}, False

    def isOpened(self):  # noqa: N802 — OpenCV's name
        return self.opened

    def set(self, prop, value):
        self.props[prop] = value
        return True

    def read(self):
        if self.remaining <= 0:
            return False, None
        self.remaining -= 1
        return True, np.full((479, 641, 3), self.remaining % 256, np.uint8)

    def release(self):
        self.released = True


class CaptureFactory:
    def __init__(self, *captures: FakeCapture):
        self.captures, self.opened = list(captures), []

    def __call__(self, index):
        capture = self.captures.pop(0) if self.captures else FakeCapture(opened=False)
        self.opened.append(capture)
        return capture


def test_camera_that_does_not_open_names_its_index():
    with pytest.raises(SourceError, match=r"camera 3 did not open"):
        CameraSource(3, open_capture=CaptureFactory(FakeCapture(opened=False)))


def test_camera_requests_size_fps_and_a_short_buffer():
    factory = CaptureFactory(FakeCapture(frames=1))
    CameraSource(1, 1280, 720, 24, open_capture=factory)
    props = factory.opened[0].props
    assert props[cv2.CAP_PROP_FRAME_WIDTH] == 1280 and props[cv2.CAP_PROP_FRAME_HEIGHT] == 720
    assert props[cv2.CAP_PROP_FPS] == 24 and props[cv2.CAP_PROP_BUFFERSIZE] == 1


@pytest.mark.timeout(20)
def test_camera_disconnect_mid_run_reconnects_then_stops_cleanly():
    factory = CaptureFactory(FakeCapture(frames=10))  # later opens fail
    log = io.StringIO()
    camera = CameraSource(0, open_capture=factory, reconnect_delays=(0.01, 0.02, 0.04), log=log)
    with pytest.raises(SourceError, match=r"camera 0 stopped delivering frames and 3 reconnect attempts failed"):
        run_loop(camera, FakeBackend(), None)
    camera.close()
    assert len(factory.opened) == 4 and all(c.released for c in factory.opened)
    assert log.getvalue().count("reconnecting") == 3


def test_camera_reconnect_that_succeeds_keeps_delivering():
    factory = CaptureFactory(FakeCapture(frames=2), FakeCapture(opened=False), FakeCapture(frames=5))
    camera = CameraSource(0, open_capture=factory, reconnect_delays=(0.0, 0.0, 0.0), log=io.StringIO())
    frames = [camera.read() for _ in range(7)]
    assert all(f is not None for f in frames) and camera.reconnects == 2


def test_camera_reconnect_wait_ends_on_stop():
    stop = threading.Event()
    stop.set()
    camera = CameraSource(0, open_capture=CaptureFactory(FakeCapture(frames=0)), reconnect_delays=(30.0,),
                          log=io.StringIO())
    assert camera.read(stop) is None


@pytest.fixture
def short_video(tmp_path):
    path = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (96, 64))
    for value in range(0, 240, 40):  # 6 frames of distinct grey levels
        writer.write(np.full((64, 96, 3), value, np.uint8))
    writer.release()
    return path


def test_video_stops_at_the_end_without_loop(short_video):
    video = VideoFileSource(short_video, loop=False, fps=0)
    frames = []
    while (frame := video.read()) is not None:
        frames.append(frame)
    video.close()
    assert len(frames) == 6
    assert [round(float(f.mean()) / 40) for f in frames] == [0, 1, 2, 3, 4, 5]


def test_video_loops_by_default(short_video):
    video = VideoFileSource(short_video, fps=0)
    levels = [round(float(video.read().mean()) / 40) for _ in range(14)]
    video.close()
    assert levels == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1]
    assert VideoFileSource(short_video).fps == pytest.approx(25)  # the file's own rate paces it


@pytest.mark.timeout(20)
def test_video_end_stops_the_loop(short_video):
    stats = run_loop(open_source(str(short_video), fps=0, loop=False), FakeBackend(), None)
    assert stats.stop_reason == "source ended" and stats.captured == 6


def test_unreadable_or_missing_video_names_the_path(tmp_path):
    bad = tmp_path / "not a video.mp4"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(SourceError, match=f"video file {bad} cannot be read"):
        open_source(str(bad))
    with pytest.raises(SourceError, match=f"video file {tmp_path / 'nope.mp4'} does not exist"):
        open_source(str(tmp_path / "nope.mp4"))


def test_open_source_dispatch(monkeypatch):
    log = io.StringIO()
    assert isinstance(open_source("synthetic", size=(100, 80), log=log), SyntheticSource)
    monkeypatch.setattr("mlx_sdxs.camera.sources._camera_present", lambda index: False)
    fallback = open_source(None, log=log)
    assert isinstance(fallback, SyntheticSource)
    assert log.getvalue().count("no camera found") == 1
    opened = []

    def fake_camera(index, *args, **kwargs):
        opened.append(index)
        raise SourceError(f"camera {index} did not open")

    monkeypatch.setattr("mlx_sdxs.camera.sources.CameraSource", fake_camera)
    with pytest.raises(SourceError, match="camera 7"):
        open_source("7")
    assert opened == [7]

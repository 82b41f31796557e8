"""Display composition, overlays, keys, EMA/blend per tick, video/PNG outputs, the broadcast, prompt files."""

from __future__ import annotations

import asyncio
import threading

import cv2
import numpy as np
import pytest
from fake_backend import count_video_frames, no_leaked_threads  # noqa: F401 (autouse fixture)

from mlx_sdxs.camera.broadcast import Broadcast
from mlx_sdxs.camera.loop import Tick
from mlx_sdxs.camera.outputs import (FramesWriter, OutputError, StatusLine, VideoRecorder, display_available,
                                     h264_available)
from mlx_sdxs.camera.presenter import Presenter, compose_frame, draw_banner, status_lines
from mlx_sdxs.camera.stages import Result
from mlx_sdxs.camera.state import LiveState, LoopControl
from mlx_sdxs.knobs import KNOBS
from mlx_sdxs.camera.prompts import GALLERY, load_prompts
from mlx_sdxs.camera.sources import SyntheticSource
from mlx_sdxs.errors import SDXSError
from mlx_sdxs.frames import fit

pytestmark = pytest.mark.policy_independent  # see pyproject.toml


@pytest.fixture
def camera_frame() -> np.ndarray:
    return SyntheticSource(641, 479, seed=1).render(5)


@pytest.fixture
def ai_frame() -> np.ndarray:
    return np.full((64, 64, 3), (200, 40, 90), np.uint8)


def test_composed_frame_halves_and_overlay(tmp_path, camera_frame, ai_frame):
    plain = compose_frame(camera_frame, ai_frame, 160)
    lines = ["AI: 3.0 FPS | Display: 2.9 FPS | Prompt 2/10: a pencil sketch"]
    shown = compose_frame(camera_frame, ai_frame, 160, lines=lines, banner="RANDOM WEIGHTS - not a trained model")
    path = tmp_path / "composed.png"
    cv2.imwrite(str(path), shown)
    saved = cv2.imread(str(path))

    assert plain.shape == saved.shape == (160, 320, 3)
    assert np.array_equal(plain[:, :160], fit(camera_frame, 160))  # same crop as the backend
    assert np.array_equal(plain[:, 160:], fit(ai_frame, 160))
    assert np.mean(np.abs(plain[:, :160].astype(int) - plain[:, 160:])) > 20
    changed = np.any(saved != plain, axis=2)
    rows = np.flatnonzero(changed.any(axis=1))
    assert changed[:40].sum() > 200, "overlay text missing at the top"
    assert changed[-30:].sum() > 1000, "banner missing at the bottom"
    assert not changed[40:-30].any(), "overlay leaked into the picture"
    assert rows.min() < 40 and rows.max() >= 130


def test_blend_mixes_the_camera_into_the_ai_half(camera_frame, ai_frame):
    full = compose_frame(camera_frame, ai_frame, 96, blend=1.0)
    assert np.array_equal(full[:, 96:], full[:, :96])
    half = compose_frame(camera_frame, ai_frame, 96, blend=0.5).astype(int)
    expected = (fit(camera_frame, 96).astype(int) + fit(ai_frame, 96)) / 2
    assert np.max(np.abs(half[:, 96:] - expected)) <= 1


def test_banner_works_on_any_channel_order():
    image = np.full((128, 256, 3), 200, np.uint8)
    out = draw_banner(image, "RANDOM WEIGHTS")
    assert out is image and np.array_equal(out[..., 0], out[..., 2])


def _tick(ai_value: int, seq: int = 1, new: bool = True) -> Tick:
    camera = np.full((48, 64, 3), 10, np.uint8)
    return Tick(camera, seq, Result(seq, 0.0, camera, np.full((32, 32, 3), ai_value, np.uint8)), new)


class _Discard:
    """An output that takes the composed view and keeps nothing (so the display stage draws)."""

    view = "display"

    def write(self, frame, now):
        pass

    def close(self):
        pass


def test_presenter_ema_keys_and_save(tmp_path):
    control = LoopControl(LiveState(gallery=GALLERY, prompt=GALLERY[0], prompt_b="a pencil sketch", prompt_blend=0.5,
                                    seed_blend=0.5, has_seed_b=True, ema=0.4))
    display = Presenter(output_size=32, save_dir=tmp_path / "saved", overlay=False, sinks=[_Discard()])
    display.present(_tick(100), control)
    display.present(_tick(200, 2), control)
    assert np.all(np.abs(display.last_frame[:, 32:].astype(int) - (0.4 * 100 + 0.6 * 200)) <= 1)
    display.present(_tick(200, 3, new=False), control)  # a camera tick: the EMA keeps easing towards 200
    assert np.all(np.abs(display.last_frame[:, 32:].astype(int) - (0.16 * 100 + 0.84 * 200)) <= 1)

    display.handle_key(ord("n"), control)
    assert control.take_requests() == {"prompt": GALLERY[1]}
    display.handle_key(ord("p"), control)
    assert control.take_requests() == {"prompt": GALLERY[-1]}  # from the state's prompt, the gallery's first
    display.handle_key(ord("]"), control)
    display.handle_key(ord(","), control)
    step = KNOBS["blend"].step  # every number knob here moves one table step per key press
    assert control.take_requests() == {"prompt_blend": 0.5 + step, "seed_blend": 0.5 - step}
    for key, attribute, value in (("+", "blend", step), ("-", "blend", 0.0), ("=", "blend", step), ("_", "blend", 0.0),
                                  ("e", "ema", 0.4 + step), ("d", "ema", 0.4)):
        display.handle_key(ord(key), control)  # display knobs: in the state at once, no model involved
        assert getattr(control.state, attribute) == pytest.approx(value)
    for _ in range(20):
        display.handle_key(ord("e"), control)
    assert control.state.ema == pytest.approx(KNOBS["ema"].high)

    display.handle_key(ord("s"), control)
    saved = list((tmp_path / "saved").glob("mlx-sdxs-*.png"))
    assert len(saved) == 1 and cv2.imread(str(saved[0])).shape == (32, 32, 3)
    assert not control.quit_requested
    display.handle_key(27, control)
    assert control.quit_requested


def test_display_overlay_names_fps_and_prompt():
    lines = status_lines(LiveState(gallery=("one", "two"), prompt="two", feedback=0.25))
    assert lines[0].startswith("AI: 0.0 FPS | Display: 0.0 FPS | Prompt 2/2: two")
    assert "feedback 0.25" in lines[1]
    assert status_lines(LiveState(gallery=("one",), prompt="three"))[0].endswith("Prompt -/1: three")


def test_video_recorder_writes_real_time_and_renames_at_close(tmp_path, camera_frame):
    path = tmp_path / "out.mp4"
    recorder = VideoRecorder(path, fps=10)
    assert recorder.codec == ("h264" if h264_available() else "mp4v")
    frame = compose_frame(camera_frame, camera_frame[:63, :97], 64)  # odd width: H.264 drops a column
    for step in range(6):  # 0.55 s of display time at 10 FPS -> 6 frames (frame 0 at t=0)
        recorder.write(frame, 100.0 + step * 0.1 + (0.05 if step else 0.0))
    assert recorder.partial.exists() and not path.exists()  # never half-written under the final name
    recorder.close()
    assert path.exists() and not recorder.partial.exists()
    assert count_video_frames(path) == recorder.frames_written == 6
    capture = cv2.VideoCapture(str(path))
    width, height = capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)
    capture.release()
    assert (width, height) == recorder.size and recorder.size[1] == 64
    with pytest.raises(OutputError, match=r"--record .*clip.avi: use a .mp4"):
        VideoRecorder(tmp_path / "clip.avi", fps=10)


@pytest.mark.skipif(not h264_available(), reason="PyAV with libx264 (the studio extra) is not installed")
def test_recording_is_h264_and_plays_up_to_a_hard_kill(tmp_path, camera_frame):
    """Fragmented MP4: even the hidden partial file of a killed process plays up to its last fragment."""
    import av

    recorder = VideoRecorder(tmp_path / "clip.mp4", fps=10, every_frame=True)
    for step in range(40):
        recorder.write(fit(camera_frame, (64, 48)), float(step))
    with av.open(str(recorder.partial)) as container:  # not closed yet: what a SIGKILL would leave
        assert container.streams.video[0].codec_context.name == "h264"
        assert sum(1 for _ in container.decode(video=0)) > 0
    recorder.close()
    assert count_video_frames(tmp_path / "clip.mp4") == 40


def test_frames_writer_numbers_pngs(tmp_path):
    writer = FramesWriter(tmp_path / "frames")
    for value in (10, 20):
        writer.write(np.full((16, 32, 3), value, np.uint8), 0.0)
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["frame_000001.png", "frame_000002.png"]


@pytest.mark.timeout(20)
def test_broadcast_hands_out_the_newest_frame_lazily_to_thread_and_async_viewers(camera_frame):
    broadcast = Broadcast("display")
    assert broadcast.next(0, 0.01) is None  # nothing yet
    for value in (10, 20, 30):
        broadcast.write(np.full((32, 32, 3), value, np.uint8))
    seq, jpeg = broadcast.next(0, 1)
    assert seq == 3 and abs(int(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).mean()) - 30) <= 2
    assert broadcast.next(3, 0.01) is None  # never the same frame twice

    writer = threading.Thread(target=broadcast.write, args=(camera_frame,))

    async def viewer():
        waiting = asyncio.ensure_future(broadcast.next_async(3, 5))
        await asyncio.sleep(0.05)
        writer.start()
        return await waiting

    seq, jpeg = asyncio.run(viewer())
    writer.join(timeout=5)  # the viewer wakes before the writer's thread has returned
    assert seq == 4 and cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == camera_frame.shape
    broadcast.close()
    assert broadcast.next(4, 5) is None and asyncio.run(broadcast.next_async(4, 5)) is None


def test_status_line_refreshes_in_place_on_a_terminal_and_every_10_s_in_a_log(capsys):
    import io

    from mlx_sdxs.camera.stats import LoopStats

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stats = LoopStats()
    stats.inferred = 7
    state = LiveState(stats=stats.live())
    terminal, log = Terminal(), io.StringIO()
    tty_line, log_line = StatusLine(terminal), StatusLine(log)
    assert (tty_line.every_s, log_line.every_s) == (0.5, 10.0)
    for now in (1e9, 1e9 + 5, 1e9 + 20):
        tty_line.update(state, now)
        log_line.update(state, now)
    tty_line.close()
    assert terminal.getvalue().count("\r\x1b[2K") == 3 and terminal.getvalue().endswith("\n")
    assert log.getvalue().count("mlx-sdxs: AI 0.00 FPS | display 0.0 FPS") == 2  # 1e9 and 1e9+20, not +5
    assert "frames 7" in log.getvalue()


def test_prompt_file_skips_comments_and_names_bad_lines(tmp_path):
    good = tmp_path / "prompts.txt"
    good.write_bytes("\ufeffa fox\n\n# comment\n  a café at night  \n".encode())
    assert load_prompts(good) == ["a fox", "a café at night"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"one\ntwo\nthr\xe9e\n")
    with pytest.raises(SDXSError, match=rf"--prompts {bad}, line 3: not valid UTF-8 \(byte 0xe9 at column 4\)"):
        load_prompts(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(SDXSError, match="no prompts"):
        load_prompts(empty)
    assert len(GALLERY) == 10 and len(set(GALLERY)) == 10


def test_display_available_follows_the_environment(monkeypatch):
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert not display_available()
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    assert display_available()

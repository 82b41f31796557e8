"""The 3-thread loop: newest-frame-wins hand-over, display at the capture rate, order, throughput, errors,
the similarity filter, per-thread MLX streams, soak."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import psutil
import pytest
from fake_backend import CountingSource, FakeBackend, no_leaked_threads, read_stamp  # noqa: F401 (autouse)

from mlx_sdxs.camera.broadcast import Broadcast
from mlx_sdxs.camera.loop import run_loop
from mlx_sdxs.camera.outputs import VideoRecorder
from mlx_sdxs.camera.presenter import Presenter
from mlx_sdxs.camera.slots import LatestSlot
from mlx_sdxs.camera.stages import SimilarityGate, WorkerError
from mlx_sdxs.camera.state import LiveState, LoopControl
from mlx_sdxs.camera.stats import RateMeter
from mlx_sdxs.errors import ImageError

pytestmark = pytest.mark.policy_independent  # see pyproject.toml


class Collector:
    """A presenter that keeps every display tick (and the new results among them) and can act at the k-th tick."""

    def __init__(self, at: int | None = None, action=None):
        self.ticks, self.results = [], []
        self.at, self.action = at, action

    def present(self, tick, control):
        self.ticks.append(tick)
        if tick.new_result:
            self.results.append(tick.result)
        if self.action is not None and len(self.ticks) == self.at:
            self.action(control)

    def idle(self, control):
        pass


@pytest.mark.timeout(10)
def test_latest_slot_keeps_only_the_newest_and_counts_the_rest():
    slot: LatestSlot[str] = LatestSlot()
    for item in "abc":
        slot.put(item)
    assert slot.take_newer(0, timeout=0) == (3, "c")
    assert slot.dropped == 2
    assert slot.take_newer(3, timeout=0) is None  # nothing newer: never handed out twice

    got = []
    waiter = threading.Thread(target=lambda: got.append(slot.take_newer(3, timeout=5)))
    waiter.start()
    slot.put("d")
    waiter.join(5)
    assert got == [(4, "d")] and slot.dropped == 2

    slot.put("e")
    slot.close()
    assert slot.take_newer(4, timeout=5) == (5, "e")  # closing keeps what is there
    assert slot.take_newer(5, timeout=5) is None  # ... then reports the end without waiting


class WatchingBackend(FakeBackend):
    """Records how many frames the source had produced when each `process` started."""

    def __init__(self, source, **kwargs):
        super().__init__(**kwargs)
        self.source, self.produced_at_start = source, []

    def process(self, frame_bgr):
        self.produced_at_start.append(self.source.produced)
        return super().process(frame_bgr)


@pytest.mark.timeout(20)
def test_newest_frame_wins_each_frame_once_in_capture_order():
    source = CountingSource(fps=500)
    backend = WatchingBackend(source, cost_s=0.01)
    presenter = Collector()
    stats = run_loop(source, backend, presenter, max_results=15)

    processed = backend.processed
    assert all(a < b for a, b in zip(processed, processed[1:])), "a frame was processed twice or out of order"
    shown = [r.seq for r in presenter.results]
    assert all(a < b for a, b in zip(shown, shown[1:])), "display order differs from capture order"
    assert all(read_stamp(r.ai) == r.seq == read_stamp(r.camera) for r in presenter.results), "camera/AI pairing"
    # Newest wins: the frame processed is the newest captured (one more may arrive between take and process).
    lag = [produced - seq for produced, seq in zip(backend.produced_at_start, processed)]
    assert max(lag) <= 2, lag
    assert stats.dropped_before_inference > 0 and stats.dropped_stale >= stats.dropped_before_inference
    in_flight = stats.captured - stats.inferred - stats.skipped_similar - stats.dropped_before_inference
    assert 0 <= in_flight <= 1
    assert stats.results_displayed == 15 and stats.stop_reason == "max results"
    assert backend.threads == {"sdxs-inference"}


@pytest.mark.timeout(20)
def test_display_ticks_at_the_capture_rate_with_the_newest_camera_frame():
    """A slow model (5 FPS) under a 100 FPS source: the display still shows every new camera frame, paired
    with the newest AI result, so the window does not freeze between results."""
    source = CountingSource(fps=100)
    presenter = Collector()
    stats = run_loop(source, FakeBackend(cost_s=0.2), presenter, duration=1.2)
    assert stats.inferred <= 8 and stats.displayed >= 4 * stats.inferred
    seqs = [tick.camera_seq for tick in presenter.ticks]
    assert all(a <= b for a, b in zip(seqs, seqs[1:]))
    for tick in presenter.ticks:
        assert read_stamp(tick.camera) == tick.camera_seq >= tick.result.seq  # the newest frame, not the AI's
        assert read_stamp(tick.result.ai) == tick.result.seq
    assert sum(tick.new_result for tick in presenter.ticks) == stats.results_displayed == len(presenter.results)
    assert stats.fps(stats.displayed) > 3 * stats.fps(stats.inferred)


@pytest.mark.timeout(30)
def test_loop_throughput_matches_the_backend_alone():
    """Structural: with capture faster than inference, the loop keeps the backend busy (>= 95 %)."""
    frames, cost = 100, 0.02
    alone = FakeBackend(cost_s=cost)
    frame = CountingSource().read()
    start = time.perf_counter()
    for _ in range(frames):
        alone.process(frame)
    standalone_s = time.perf_counter() - start

    backend = FakeBackend(cost_s=cost)
    stats = run_loop(CountingSource(fps=200), backend, Collector(), max_results=frames)
    loop_s = backend.spans[frames - 1][1] - backend.spans[0][0]
    ratio = standalone_s / loop_s
    print(f"standalone {frames / standalone_s:.1f} FPS, in loop {frames / loop_s:.1f} FPS, ratio {ratio:.3f}")
    assert stats.inferred >= frames
    assert ratio >= 0.95


@pytest.mark.timeout(20)
def test_backend_exception_stops_everything_within_two_seconds():
    backend = FakeBackend(cost_s=0.005, fail_at=5)
    message = r"inference thread failed at frame \d+: RuntimeError: fake failure at call 5"
    with pytest.raises(WorkerError, match=message):
        run_loop(CountingSource(fps=200), backend, Collector())
    assert time.perf_counter() - backend.failed_at < 2.0


@pytest.mark.timeout(20)
def test_source_end_drains_the_last_frame_then_stops():
    source = CountingSource(fps=0, count=5)
    presenter = Collector()
    stats = run_loop(source, FakeBackend(cost_s=0.01), presenter)
    assert stats.stop_reason == "source ended"
    assert presenter.results[-1].seq == 5  # the final frame is never dropped
    assert stats.captured == 5


@pytest.mark.timeout(20)
def test_duration_stops_the_loop():
    stats = run_loop(CountingSource(fps=100), FakeBackend(), Collector(), duration=0.3)
    assert stats.stop_reason == "duration"
    assert 0.3 <= stats.elapsed_s < 1.5 and stats.displayed > 0


@pytest.mark.timeout(20)
def test_prompt_and_warmup_run_on_the_inference_thread():
    backend = FakeBackend()
    control = LoopControl()
    control.request(prompt="first")  # the initial prompt goes the way every later change goes
    presenter = Collector(at=3, action=lambda control: control.request(prompt="a pencil sketch"))
    run_loop(CountingSource(fps=200), backend, presenter, control=control, warmup=True, max_results=8)
    assert backend.prompts == ["first", "a pencil sketch"] and backend.warmed
    assert backend.threads == {"sdxs-inference"}
    assert control.state.prompt == "a pencil sketch"


@pytest.mark.timeout(20)
def test_knob_requests_reach_the_backend_before_the_next_frame():
    from mlx_sdxs.camera.state import LiveState
    from mlx_sdxs.errors import ConfigError

    backend = FakeBackend()
    control = LoopControl(LiveState(seed_blend=0.0, has_seed_b=True))
    control.request(prompt="a")

    def turn_knobs(control):
        control.request(feedback=0.3, prompt_blend=0.7, seed_blend=0.2, blend=0.4)

    run_loop(CountingSource(fps=200), backend, Collector(at=2, action=turn_knobs), control=control, max_results=6)
    assert ("feedback", 0.3) in backend.requests and ("prompt_blend", 0.7) in backend.requests
    assert ("seed_blend", 0.2) in backend.requests
    state = control.state
    assert (state.feedback, state.prompt_blend, state.seed_blend, state.blend) == (0.3, 0.7, 0.2, 0.4)
    with pytest.raises(ConfigError, match="unknown knob"):
        LoopControl().request(strength=0.5)
    with pytest.raises(ConfigError, match="needs a second random seed"):
        LoopControl().request(seed_blend=0.5)
    with pytest.raises(ConfigError, match="feedback must be in"):
        LoopControl().request(feedback=1.5)


@pytest.mark.timeout(20)
def test_control_knobs_reach_a_controlnet_backend_and_are_refused_without_one():
    from mlx_sdxs.camera.state import LiveState
    from mlx_sdxs.errors import ConfigError

    backend = FakeBackend()
    backend.controlled = True
    control = LoopControl(LiveState(control="edges", control_strength=0.8, controlled=True))
    control.request(prompt="a")

    def turn_knobs(control):
        control.request(control="sketch", control_strength=1.25)

    run_loop(CountingSource(fps=200), backend, Collector(at=2, action=turn_knobs), control=control, max_results=5)
    assert ("control", "sketch") in backend.requests and ("control_strength", 1.25) in backend.requests
    assert (control.state.control, control.state.control_strength) == ("sketch", 1.25)
    with pytest.raises(ConfigError, match="control strength needs a model with a ControlNet"):
        LoopControl().request(control_strength=0.5)
    with pytest.raises(ConfigError, match="control must be one of"):
        control.request(control="canny")
    with pytest.raises(ConfigError, match="control strength must be in"):
        control.request(control_strength=3)


@pytest.mark.timeout(20)
def test_quit_request_stops_the_loop():
    stats = run_loop(CountingSource(fps=200), FakeBackend(), Collector(at=4, action=LoopControl.quit))
    assert stats.stop_reason == "quit" and stats.displayed == 4


@pytest.mark.timeout(20)
def test_window_keys_work_during_warmup():
    """The presenter keeps polling while the backend warms up, and quitting then skips the session."""
    backend = FakeBackend()
    released = threading.Event()
    backend.warmup = lambda: released.wait(10)

    class QuitWhileWaiting(Collector):
        def idle(self, control):
            control.quit()
            released.set()

    source = CountingSource(fps=200)
    stats = run_loop(source, backend, QuitWhileWaiting(), warmup=True)
    assert stats.stop_reason == "quit" and stats.displayed == 0 and source.produced == 0


def _similarity(threshold: float) -> LoopControl:
    return LoopControl(LiveState(similarity_threshold=threshold))


@pytest.mark.timeout(20)
def test_similarity_filter_skips_identical_frames_and_counts_them():
    static = CountingSource(fps=500, static=True)
    presenter = Collector()
    stats = run_loop(static, FakeBackend(), presenter, max_frames=20, control=_similarity(1.0))
    assert stats.inferred == 1 and stats.skipped_similar >= 15
    assert len(presenter.results) == 1  # only the first frame was processed; the display kept showing it

    stats = run_loop(CountingSource(fps=500, static=True), FakeBackend(), Collector(), max_results=20,
                     control=_similarity(0.0))
    assert stats.skipped_similar == 0 and stats.inferred >= 20  # threshold 0 = off

    stats = run_loop(CountingSource(fps=500), FakeBackend(), Collector(), max_results=20, control=_similarity(1.0))
    assert stats.skipped_similar == 0  # moving frames are all processed


def test_similarity_gate_is_forced_open_after_a_prompt_change():
    gate = SimilarityGate(threshold=2.0)
    frame = np.full((48, 64, 3), 90, np.uint8)
    assert not gate.should_skip(frame)  # first frame: no reference
    assert gate.should_skip(frame)
    assert gate.should_skip(frame + 1)  # one grey level: below the threshold
    assert not gate.should_skip(frame + 5)
    small_motion = frame + 5
    small_motion[10:14, 20:24] += 40  # a small object moving: 0.5 % of the frame
    assert not gate.should_skip(small_motion)
    gate.should_skip(frame + 5)
    gate.force(2)  # the backend is morphing to a new prompt: keep processing
    assert not gate.should_skip(frame + 5) and not gate.should_skip(frame + 5)
    assert gate.should_skip(frame + 5)


@pytest.mark.timeout(20)
def test_odd_frame_sizes_flow_through_backend_and_display():
    class Shown:
        view, frames = "display", []

        def write(self, frame, now):
            self.frames.append(frame)

        def close(self):
            pass

    display = Presenter(output_size=96, sinks=[Shown()])
    presenter = Collector()

    class Both:
        def present(self, tick, control):
            display.present(tick, control)
            presenter.present(tick, control)

        def idle(self, control):
            pass

    run_loop(CountingSource(641, 479, fps=200), FakeBackend(render_size=(96, 64)), Both(), max_frames=3)
    assert presenter.results[0].camera.shape == (479, 641, 3) and presenter.results[0].ai.shape == (64, 96, 3)
    assert display.sinks[0].frames[0].shape == (96, 288, 3)  # two 144×96 halves: the render aspect, 96 tall


class TinySource:
    name = "tiny test source"
    fps = 0.0

    def read(self, stop=None):
        return np.zeros((1, 1, 3), np.uint8)

    def close(self):
        pass


@pytest.mark.timeout(10)
def test_a_one_pixel_source_is_refused_clearly():
    with pytest.raises(ImageError, match=r"tiny test source delivered a 1×1 frame: too small"):
        run_loop(TinySource(), FakeBackend(), Collector())


def test_rate_meter_reports_recent_rate_and_decays_to_zero():
    meter = RateMeter(window=5)
    for stamp in (10.0, 10.5, 11.0, 11.5, 12.0, 12.5):
        meter.tick(stamp)
    assert meter.rate(now=12.6) == pytest.approx(2.0)
    assert meter.rate(now=20.0) == 0.0  # nothing for a while: not the last rate forever


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count file descriptors")
@pytest.mark.timeout(90)
def test_soak_ten_thousand_frames_without_leaks(tmp_path):
    """10,000 frames through loop + display + recorder + a broadcast with a viewer thread: bounded memory,
    no thread/fd leak."""

    def session(frames: int, index: int) -> None:
        broadcast = Broadcast("display")
        recorder = VideoRecorder(tmp_path / f"soak{index}.mp4", fps=10)
        display = Presenter(output_size=32, sinks=[recorder, broadcast])
        viewed = []

        def viewer():
            seq = 0
            while not broadcast.closed:
                got = broadcast.next(seq, 0.5)
                if got:
                    seq = got[0]
                    viewed.append(len(got[1]))

        watcher = threading.Thread(target=viewer)
        watcher.start()
        try:
            stats = run_loop(CountingSource(32, 32, fps=4000), FakeBackend(render_size=32), display,
                             max_frames=frames)
        finally:
            display.close()
            watcher.join(5)
        assert stats.displayed == frames and viewed

    session(300, 0)  # allocate caches, codecs and the like first
    process = psutil.Process()
    rss, fds = process.memory_info().rss, _open_fds()
    start = time.perf_counter()
    session(10_000, 1)
    growth_mb = (process.memory_info().rss - rss) / 2**20
    print(f"soak: 10,000 frames in {time.perf_counter() - start:.1f} s, RSS growth {growth_mb:.1f} MB")
    assert growth_mb < 50
    assert _open_fds() == fds


class MLXStreamBackend(FakeBackend):
    """A FakeBackend that runs a compiled MLX function per frame inside `runtime.worker_thread()`, as the
    MLX engine does, and records the stream each frame ran on."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.streams = []

    def worker(self):
        from mlx_sdxs import runtime

        return runtime.worker_thread()

    def process(self, frame):
        import mlx.core as mx

        from mlx_sdxs import runtime

        owned = runtime.current_stream()
        self.streams.append((owned, threading.current_thread()))
        mx.eval(mx.compile(lambda a: a * 2 + 1)(mx.array(frame[:4, :4, 0].astype(np.float32))))
        return super().process(frame)


@pytest.mark.timeout(30)
def test_inference_runs_on_a_stream_its_thread_owns_and_releases_it():
    backend = MLXStreamBackend()
    run_loop(CountingSource(64, 48, fps=200), backend, Collector(), max_results=3)
    owners = {id(owned) for owned, _ in backend.streams}
    assert len(owners) == 1 and all(owned is not None and owned.thread is thread and owned.released
                                    for owned, thread in backend.streams)


@pytest.mark.timeout(30)
def test_worker_thread_state_is_released_before_the_thread_ends():
    """MLX frees its per-thread `mx.compile` cache in a C++ thread_local destructor that runs after
    `Thread.join` returns; a program exiting right then aborted in 1 of 10 camera runs. `worker_thread`
    releases that state (`mx.clear_streams`) on the thread itself, while Python runs: afterwards the thread
    has no MLX stream left at all, which is what this checks — on any OS, without /proc."""
    import mlx.core as mx

    from mlx_sdxs import runtime

    seen = {}

    def work():
        with runtime.worker_thread():
            mx.eval(mx.compile(lambda a: a + 1)(mx.ones(3)))
        try:
            mx.eval(mx.ones(2) + 1)
            seen["after"] = "still had a stream"
        except RuntimeError as exc:
            seen["after"] = str(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(10)
    assert "no Stream" in seen["after"]
    mx.eval(mx.ones(2) + 1)  # the main thread's own stream is untouched


@pytest.mark.timeout(60)
def test_mlx_work_moved_to_the_wrong_thread_is_refused():
    """The real MLX engine: once its inference thread owns the stream, a stage that calls it from the
    display thread gets StreamOwnershipError, not MLX's "There is no Stream(…)"."""
    from mlx_sdxs.pipeline import SDXSPipeline
    from mlx_sdxs.recipe import RecipeSettings
    from mlx_sdxs.runtime import StreamOwnershipError

    backend = SDXSPipeline.random("random-tiny").stream(RecipeSettings(render_size=64), "a cat")

    class WrongThread(Collector):
        def present(self, tick, control):
            backend.process(tick.camera)  # inference work on the display thread

    with pytest.raises(StreamOwnershipError, match="belongs to thread 'sdxs-inference'"):
        run_loop(CountingSource(64, 48, fps=100), backend, WrongThread(), max_results=2)
    stats = run_loop(CountingSource(64, 48, fps=100), backend, Collector(), max_results=2)
    assert stats.inferred >= 2  # the right thread, after the stream was released: fine

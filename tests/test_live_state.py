"""One live state: a knob turned from the studio's controls is the value the next frame uses, and the value
every reader shows — a viewer's status, the status line, the overlay of the display view (what
/stream.mjpg serves) — with no copy anywhere that could disagree."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from fake_backend import CountingSource, FakeBackend, no_leaked_threads  # noqa: F401 (autouse fixture)

from mlx_sdxs.camera import presenter as presenter_module
from mlx_sdxs.camera.broadcast import Broadcast
from mlx_sdxs.camera.loop import run_loop
from mlx_sdxs.camera.outputs import StatusLine
from mlx_sdxs.camera.picker import SwitchableSource
from mlx_sdxs.camera.presenter import Presenter
from mlx_sdxs.camera.state import LiveState, LoopControl
from mlx_sdxs.studio.controls import Controls
from mlx_sdxs.studio.recording import RecordingSink

pytestmark = pytest.mark.policy_independent  # see pyproject.toml


class KnobBackend(FakeBackend):
    """Logs knob hand-overs and frames in the order they happen."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.events: list[tuple] = []
        self.feedback = 0.1

    def set_feedback(self, feedback):
        self.feedback = feedback
        self.events.append(("feedback", feedback))

    def process(self, frame):
        self.events.append(("frame", self.feedback))
        return super().process(frame)


class Studio(Presenter):
    """The real presenter (with a display broadcast, as the studio has) that, at its 5th tick, turns knobs from
    the studio's controls the way the page's messages do, then records what each reader shows."""

    def __init__(self, controls: Controls, message: dict, **kwargs):
        super().__init__(**kwargs)
        self.controls, self.message, self.ticks = controls, message, 0
        self.after: list[dict] = []

    def present(self, tick, control):
        self.ticks += 1
        if self.ticks == 5:
            self.controls.handle(self.message)
        super().present(tick, control)
        if self.ticks > 5:
            self.after.append({"viewer": self.controls.status(), "status line": StatusLine.line(control.state),
                               "ai view": self.sinks[0].latest_frame(), "camera view": self.sinks[1].latest_frame()})


@pytest.fixture
def session(tmp_path, monkeypatch):
    drawn = []  # the state each display view's overlay was drawn from
    monkeypatch.setattr(presenter_module, "status_lines", lambda state: drawn.append(state) or ["overlay"])
    control = LoopControl(LiveState(gallery=("a",)))
    control.request(prompt="a", feedback=0.1)
    picker = SwitchableSource({"counting": lambda: CountingSource(fps=200)}, "counting")
    controls = Controls(control, picker, RecordingSink(tmp_path, 30.0, io.StringIO()), Counter())
    yield control, picker, controls, drawn
    picker.close()


@pytest.mark.timeout(30)
def test_a_model_knob_from_the_studio_reaches_the_next_frame_and_every_reader(session):
    control, picker, controls, drawn = session
    backend = KnobBackend()
    studio = Studio(controls, {"type": "settings", "feedback": 0.37}, output_size=64,
                    sinks=[Broadcast("ai"), Broadcast("camera"), Broadcast("display")])
    run_loop(picker, backend, studio, control=control, max_results=12)
    studio.close()

    handed_over = backend.events.index(("feedback", 0.37))
    frames_after = [value for kind, value in backend.events[handed_over:] if kind == "frame"]
    assert frames_after and set(frames_after) == {0.37}  # the next frame, and every one after, uses it
    assert all(value == 0.1 for kind, value in backend.events[:handed_over] if kind == "frame")
    last = studio.after[-1]
    assert last["viewer"]["feedback"] == 0.37  # what each viewer's status says
    assert "feedback 0.37" in last["status line"]
    assert drawn[-1].feedback == 0.37  # the overlay on the display view (the MJPEG stream)
    # The state never runs ahead of the frames: until the hand-over it said 0.1 everywhere.
    assert drawn[0].feedback == 0.1


@pytest.mark.timeout(30)
def test_a_display_knob_from_the_studio_shows_on_the_next_tick(session):
    control, picker, controls, drawn = session
    studio = Studio(controls, {"type": "settings", "blend": 1.0}, output_size=64,
                    sinks=[Broadcast("ai"), Broadcast("camera"), Broadcast("display")])
    run_loop(picker, FakeBackend(), studio, control=control, max_frames=10)
    studio.close()
    first, last = studio.after[0], studio.after[-1]
    assert first["viewer"]["blend"] == last["viewer"]["blend"] == 1.0 and drawn[-1].blend == 1.0
    # Blend 1 on the very next tick: the AI view as shown is the camera frame (FakeBackend's AI image is its
    # inverse, so without the blend the two would differ everywhere).
    for shown in (first, last):
        np.testing.assert_array_equal(shown["ai view"], shown["camera view"])

"""The one table of knobs: every knob reaches every surface built from it (the CLI with its range, the live
check, the presenter's keys and overlay, the studio's status and page, OSC), and the live figures agree with
the session summary."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fake_backend import CountingSource, FakeBackend, no_leaked_threads  # noqa: F401 (autouse fixture)

from mlx_sdxs.camera.loop import run_loop
from mlx_sdxs.camera.outputs import StatusLine
from mlx_sdxs.camera.presenter import Presenter, status_lines
from mlx_sdxs.camera.state import LiveState, LoopControl, checked
from mlx_sdxs.cli import build_parser
from mlx_sdxs.errors import ConfigError
from mlx_sdxs.knobs import KNOBS, TABLE

pytestmark = pytest.mark.policy_independent  # see pyproject.toml

ROOT = Path(__file__).resolve().parents[1]
#: A session that has every knob: a ControlNet and a second random seed.
EVERYTHING = LiveState(prompt="a fox", prompt_b="a whale", control="edges", controlled=True, has_seed_b=True,
                       gallery=("a fox",))


def valid_value(knob):
    if knob.kind == "choice":
        return knob.choices[-1]
    return (knob.low + knob.high) / 2 if knob.kind == "number" else "a lighthouse"


@pytest.mark.parametrize("command", ["camera", "studio"])
def test_every_knob_has_a_flag_with_its_range_checked_by_argparse(command, capsys):
    parser = build_parser()
    help_text = " ".join(parser._subparsers._group_actions[0].choices[command].format_help().split())
    for knob in TABLE:
        value = valid_value(knob)
        args = parser.parse_args([command, knob.flag, str(value)])
        assert getattr(args, knob.name) == value, knob.name
        assert knob.flag in help_text
        if knob.kind == "number":
            assert f"{knob.low:g}–{knob.high:g}" in help_text, f"{knob.flag}'s range is not in --help"
            for bad in (knob.high + 1, knob.low - 1, "nan"):
                with pytest.raises(SystemExit):
                    parser.parse_args([command, knob.flag, str(bad)])
                assert f"{knob.flag} must be in [{knob.low}, {knob.high}]" in capsys.readouterr().err
        if knob.kind == "choice":
            with pytest.raises(SystemExit):
                parser.parse_args([command, knob.flag, "nothing"])
            assert "invalid choice" in capsys.readouterr().err


def test_every_knob_is_checked_live_and_shown_by_the_studio_and_the_overlay():
    from mlx_sdxs.camera.picker import SwitchableSource
    from mlx_sdxs.studio.controls import Controls
    from mlx_sdxs.studio.recording import RecordingSink

    control = LoopControl(EVERYTHING)
    source = SwitchableSource({"synthetic": lambda: CountingSource()}, "synthetic", 30)
    controls = Controls(control, source, RecordingSink(Path("."), 30, sys.stderr), Counter())
    overlay = "\n".join(status_lines(EVERYTHING))
    for knob in TABLE:
        value = valid_value(knob)
        assert checked(EVERYTHING, {knob.name: value}) == {knob.name: value}
        assert hasattr(LiveState(), knob.name), f"LiveState has no field for {knob.name}"
        if knob.kind == "number":
            with pytest.raises(ConfigError, match=f"{knob.words} must be in"):
                checked(EVERYTHING, {knob.name: knob.high + 1})
            assert knob.words in overlay, f"the overlay does not show {knob.name}"
        control.request(**{knob.name: value})
        status = controls.status()
        assert knob.name in status["knobs"]
        if knob.acts == "display":
            assert status[knob.name] == value  # display knobs are published at once; the others by the loop
    assert set(control.take_requests()) == {k.name for k in TABLE if k.acts != "display"}
    # A session without a ControlNet or second seed has neither their knobs nor their controls.
    plain = LiveState(prompt="a fox")
    assert "control_strength" not in plain.knobs() and "seed_blend" not in plain.knobs()
    with pytest.raises(ConfigError, match="control strength needs a model with a ControlNet"):
        checked(plain, {"control_strength": 1.0})


def test_every_keyed_knob_answers_its_keys_within_its_range():
    control = LoopControl(EVERYTHING)
    presenter = Presenter(output_size=32)
    for knob in (k for k in TABLE if k.keys):
        down, up = knob.keys
        for _ in range(int((knob.high - knob.low) / knob.step) + 2):
            presenter.handle_key(ord(up), control)
        assert control.wanted(knob.name) == knob.high  # presses step from the newest request, not the state
        presenter.handle_key(ord(down), control)
        assert control.wanted(knob.name) == pytest.approx(knob.high - knob.step)


def test_the_page_builds_its_controls_from_the_knob_table():
    app = (ROOT / "mlx_sdxs" / "studio" / "static" / "app.js").read_text()
    page = (ROOT / "mlx_sdxs" / "studio" / "static" / "index.html").read_text()
    assert 'fetch("/api/knobs")' in app and 'id="knobs"' in page
    for knob in TABLE:  # no hand-written control for a knob: the table is the only list
        assert f'id="{knob.name.replace("_", "-")}"' not in page or knob.kind == "text"


def test_an_out_of_range_flag_stops_before_anything_loads():
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mlx_sdxs.cli", "camera", "--ema", "0.97"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2 and "--ema must be in [0.0, 0.95], got 0.97" in result.stderr
    assert "Traceback" not in result.stderr and "warming up" not in result.stderr
    print(f"refused in {elapsed:.2f} s")


class Recorder(Presenter):
    """Notes what a watcher sees each tick: the overlay's AI FPS and the status line."""

    def __init__(self):
        super().__init__(output_size=32)
        self.seen: list[tuple[float, str]] = []

    def present(self, tick, control):
        super().present(tick, control)
        self.seen.append((control.state.stats["ai_fps"], StatusLine.line(control.state)))


@pytest.mark.timeout(30)
def test_live_figures_agree_with_the_summary_from_the_first_result():
    presenter = Recorder()
    presenter.sinks.append(type("Discard", (), {"view": "ai", "write": lambda *a: None, "close": lambda s: None})())
    stats = run_loop(CountingSource(fps=60), FakeBackend(cost_s=0.05), presenter, warmup=True, max_results=12)
    assert presenter.seen.index(next(s for s in presenter.seen if s[0] > 0)) <= 3, "no AI FPS shown at first"
    assert not any("waiting" in line for _, line in presenter.seen), "said 'waiting' after the loop started"
    # Until 30 results the live figure is the summary's own formula (results over the time since the start), so
    # read at the session's end it is the summary's figure exactly, and at any tick what the summary would say then.
    end = stats.ai_rate.started + stats.elapsed_s
    assert stats.ai_rate.rate(end) == pytest.approx(stats.fps(stats.inferred), rel=1e-9)
    assert stats.inferred < 30  # (the display, ticking at the camera's rate, is past its window: the same meter)


@pytest.mark.timeout(30)
def test_a_prompt_sent_while_the_model_loads_is_the_prompt_the_first_frame_uses():
    from mlx_sdxs.camera.session import Session

    args = build_parser().parse_args(["camera", "--source", "synthetic", "--headless", "--render-size", "64",
                                      "--max-frames", "2", "--prompt", "the flag's prompt"])
    backends = []

    def page_while_loading(session):  # a control surface attached before the model loads, as the studio is
        session.control.request(prompt="the page's prompt", ema=0.1)
        return type("Closer", (), {"close": lambda self: None})()

    def make_backend(args):
        backends.append(FakeBackend(render_size=args.render_size))
        return backends[-1]

    session = Session.open(args, make_backend, attach=[page_while_loading])
    try:
        session.run()
    finally:
        session.close(0)
    assert backends[0].prompts[0] == "the page's prompt"
    assert session.control.state.prompt == "the page's prompt" and session.control.state.ema == 0.1


def test_the_readme_table_lists_every_knob():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| knob (flag"):readme.index("**OSC control**")]
    assert [line.split("`")[1] for line in table.splitlines()[2:] if line.startswith("| `")] == \
        [knob.flag for knob in TABLE]

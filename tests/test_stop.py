"""A stop that finds the model mid-call never aborts the process.

`mlx-sdxs camera` is stopped with SIGTERM while its inference thread is inside a long MLX evaluation (C++,
the GIL released), past the thread's join limit. Left to interpreter shutdown, that thread is ended inside
C++ frames and the process aborts: "terminate called without an active exception", exit −6 (reproduced
with `mlx_sdxs.cli.main` in place of the entry point). The entry point instead says so and leaves with the
stop's status once every output is closed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.policy_independent  # see pyproject.toml

ROOT = Path(__file__).resolve().parents[1]
JOIN_LIMIT_S = 1.0

SCRIPT = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(Path(__file__).parent)!r})
    import mlx.core as mx
    import mlx_sdxs.camera.loop as loop
    import mlx_sdxs.cli as cli
    from fake_backend import FakeBackend

    loop.INFERENCE_JOIN_S = {JOIN_LIMIT_S}

    class InsideTheModel(FakeBackend):
        def process(self, frame):
            out = super().process(frame)
            if len(self.processed) == 3:
                print("inside the model", file=sys.stderr, flush=True)
                a = mx.random.normal((1024, 1024), stream=mx.cpu)
                for _ in range(2000):  # ~20 s of matmuls, evaluated in C++ with the GIL released
                    a = (a @ a) * 1e-3
                mx.eval(a)
            return out

    cli.open_stream_backend = lambda args: InsideTheModel(render_size=args.render_size)
    sys.argv = ["mlx-sdxs", "camera", "--source", "synthetic", "--headless", "--render-size", "128",
                "--similarity-threshold", "0"]
    cli.entry_point()
""")


@pytest.mark.timeout(120)
def test_sigterm_while_the_model_runs_past_the_join_limit_exits_130_with_a_message():
    process = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stderr:  # the frame that will not finish soon has started
        if "inside the model" in line:
            break
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=90)
    waited = time.monotonic() - sent
    assert process.returncode == 130, err
    assert "terminated (SIGTERM)" in err and "terminate called" not in err
    assert f"the sdxs-inference thread did not stop within {JOIN_LIMIT_S:.0f} s" in err
    assert "leaving without waiting for sdxs-inference (a model call still running)" in err
    assert "(interrupted)" in out  # the session's summary came first
    assert waited < JOIN_LIMIT_S + 10  # not the ~20 s the model call would have taken

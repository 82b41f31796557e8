"""What the camera loop itself costs: the real `mlx-sdxs camera` session around a simulated device.

    python -m bench.loop [--device-ms 8,25] [--render-size 512] [--fps 240] [--duration 15]

The backend does a real backend's host work per frame (fit the camera frame to the render size, hand
back a fresh uint8 frame) and stands in for the GPU with a device that takes `--device-ms` per frame,
one frame after another, outside the GIL (`time.sleep`): submitted frames queue on it like kernels on a
GPU, and `collect` waits for its frame. Everything else — the synthetic source at `--fps`, the three
threads, headless outputs and status line — is the real session. The ideal is 1000 / device-ms frames
per second; the ratio to it is what the loop loses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from mlx_sdxs import frames


class SimulatedDevice:
    """A Backend whose device takes `device_s` per frame, one at a time, without holding the GIL."""

    label = None
    controlled = False

    def __init__(self, render_size: tuple[int, int], device_s: float):
        self.render_size, self.device_s = render_size, device_s
        self.name = f"simulated device ({device_s * 1000:g} ms/frame)"
        self.profile_stages = False
        self.last_stage_ms: dict[str, float] = {}
        self.done_at: list[float] = []
        self._device_free = 0.0

    def set_prompt(self, prompt, prompt_b=None, blend=None) -> tuple[str, ...]:
        return ()

    def set_prompt_blend(self, blend: float) -> None:
        pass

    def set_feedback(self, feedback: float) -> None:
        pass

    def set_seed_blend(self, blend: float) -> None:
        pass

    def set_control_mode(self, mode: str) -> None:
        pass

    def set_control_strength(self, strength: float) -> None:
        pass

    def worker(self):
        return nullcontext()

    def warmup(self) -> None:
        pass

    def submit(self, frame_bgr: np.ndarray) -> tuple[float, np.ndarray]:
        fitted = frames.fit(frame_bgr, self.render_size)
        start = max(time.perf_counter(), self._device_free)
        self._device_free = start + self.device_s
        return self._device_free, fitted

    def collect(self, pending: tuple[float, np.ndarray]) -> np.ndarray:
        done, fitted = pending
        wait = done - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        self.done_at.append(time.perf_counter())
        return 255 - fitted  # a new frame, as a device's download is

    def process(self, frame_bgr: np.ndarray) -> np.ndarray:
        return self.collect(self.submit(frame_bgr))

    def close(self) -> None:
        pass


def run_session(device_ms: float, args: argparse.Namespace) -> dict:
    """One `camera` session (from its own argument parser) on the simulated device; the device's FPS over the
    session's second half (warm-up and start left out)."""
    from mlx_sdxs.camera.app import run_camera
    from mlx_sdxs.cli import build_parser

    size = (args.render_size, args.render_size)
    backends: list[SimulatedDevice] = []

    def make_backend(parsed):
        backends.append(SimulatedDevice(size, device_ms / 1000))
        return backends[-1]

    camera = build_parser().parse_args(["camera", "--source", "synthetic", "--fps", str(args.fps), "--headless",
                                        "--render-size", str(args.render_size), "--duration", str(args.duration)])
    status = run_camera(camera, make_backend)
    stamps = backends[-1].done_at
    half = stamps[len(stamps) // 2:]
    fps = (len(half) - 1) / (half[-1] - half[0]) if len(half) > 1 else 0.0
    ideal = 1000.0 / device_ms
    return {"device_ms": device_ms, "ai_fps": round(fps, 2), "ideal_fps": round(ideal, 2),
            "ratio": round(fps / ideal, 3), "frames": len(stamps), "exit_status": status}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device-ms", default="8,25", help="simulated device ms per frame, comma-separated")
    parser.add_argument("--render-size", type=int, default=512)
    parser.add_argument("--fps", type=float, default=240.0, help="the synthetic source's rate")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per session")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = [run_session(float(ms), args) for ms in args.device_ms.split(",")]
    print("| device ms/frame | ideal FPS | AI FPS | ratio |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['device_ms']:g} | {r['ideal_fps']:.1f} | {r['ai_fps']:.1f} | {r['ratio']:.3f} |")
    if args.out is not None:
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

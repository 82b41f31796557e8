"""Many viewers on one studio: the loop must not slow down, and nothing may pile up.

    python -m bench.studio_load [--viewers 20] [--seconds 60] [--out bench/results]

Starts `mlx-sdxs studio` on the random-tiny model (synthetic source), measures the AI FPS with one
viewer, then with `--viewers` viewers (each a WebSocket reading every frame it is sent, one of them
slow), sampling the server's RSS, file descriptors and threads; then disconnects everyone and checks
those are back to where they were.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import websockets

from bench.report import RUNS, run_stem
from mlx_sdxs import loopback

ROOT = Path(__file__).resolve().parents[1]
URL_LINE = re.compile(rf"studio at http://{re.escape(loopback.HOST)}:(\d+)/\?token=([\w-]+)")


def start_studio(render_size: str) -> tuple[subprocess.Popen, int, str]:
    command = [sys.executable, "-m", "mlx_sdxs.cli", "studio", "--model", "random-tiny", "--source", "synthetic",
               "--port", "0", "--render-size", render_size, "--similarity-threshold", "0"]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stderr:
        match = URL_LINE.search(line)
        if match:
            return process, int(match.group(1)), match.group(2)
    raise SystemExit("studio did not start")


def sample(process: psutil.Process) -> dict:
    return {"rss_mb": process.memory_info().rss / 2**20, "fds": process.num_fds(), "threads": process.num_threads()}


async def viewer(url: str, seconds: float, slow: bool, counts: list) -> None:
    async with websockets.connect(url, max_size=2**24) as ws:
        deadline = time.monotonic() + seconds
        frames = 0
        while time.monotonic() < deadline:
            message = await ws.recv()
            if isinstance(message, bytes):
                frames += 1
                if slow:
                    await asyncio.sleep(0.5)  # a viewer on a bad link: it must not slow the loop down
        counts.append(frames)


async def phase(port: int, token: str, viewers: int, seconds: float, process: psutil.Process) -> dict:
    url = f"ws://{loopback.HOST}:{port}/ws?token={token}"
    counts: list[int] = []
    samples = []
    tasks = [asyncio.ensure_future(viewer(url, seconds, slow=i == 1, counts=counts)) for i in range(viewers)]
    start = time.monotonic()
    me = psutil.Process()
    server_cpu, client_cpu = sum(process.cpu_times()[:2]), sum(me.cpu_times()[:2])
    async with websockets.connect(url) as probe:  # reads the server's own AI FPS from its status messages
        await asyncio.sleep(min(5.0, seconds / 4))  # let the rates settle before reading them
        rates = []
        while time.monotonic() - start < seconds:
            message = await probe.recv()
            if isinstance(message, str):
                status = json.loads(message)
                if status.get("type") == "status":
                    rates.append(status["ai_fps"])
                    samples.append(sample(process))
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    return {"viewers": viewers, "ai_fps": sum(rates) / len(rates), "frames_per_viewer": sorted(counts),
            "server_cpu": (sum(process.cpu_times()[:2]) - server_cpu) / elapsed,
            "client_cpu": (sum(me.cpu_times()[:2]) - client_cpu) / elapsed,
            "rss_mb_first": samples[0]["rss_mb"], "rss_mb_last": samples[-1]["rss_mb"],
            "rss_mb_max": max(s["rss_mb"] for s in samples), "threads_max": max(s["threads"] for s in samples)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.studio_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--render-size", default="256")
    parser.add_argument("--out", type=Path, default=RUNS)
    args = parser.parse_args(argv)
    server, port, token = start_studio(args.render_size)
    process = psutil.Process(server.pid)
    try:
        time.sleep(3)  # warm-up frames before the baseline (the first status arrives after it)
        baseline = sample(process)
        single = asyncio.run(phase(port, token, 1, args.seconds, process))
        crowd = asyncio.run(phase(port, token, args.viewers, args.seconds, process))
        time.sleep(2)  # the server notices the closed sockets
        after = sample(process)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    ratio = crowd["ai_fps"] / single["ai_fps"]
    lines = [f"Studio load ({args.viewers} viewers for {args.seconds:.0f} s, one of them slow; random-tiny at "
             f"{args.render_size}, synthetic source; {psutil.cpu_count()} CPUs)", "",
             "| phase | AI FPS | frames per viewer (min–max) | RSS first → last (max) MB | threads max | "
             "server CPU (cores) | load-generator CPU (cores) |",
             "|---|---|---|---|---|---|---|"]
    for name, result in (("1 viewer", single), (f"{args.viewers} viewers", crowd)):
        counts = result["frames_per_viewer"]
        lines.append(f"| {name} | {result['ai_fps']:.2f} | {counts[0]}–{counts[-1]} | {result['rss_mb_first']:.0f} → "
                     f"{result['rss_mb_last']:.0f} ({result['rss_mb_max']:.0f}) | {result['threads_max']} | "
                     f"{result['server_cpu']:.2f} | {result['client_cpu']:.2f} |")
    lines += ["", f"AI FPS with {args.viewers} viewers / with 1: {ratio:.3f} (goal ≥ 0.90).",
              f"Before: {baseline['fds']} fds, {baseline['threads']} threads; after everyone left: {after['fds']} fds, "
              f"{after['threads']} threads; RSS {baseline['rss_mb']:.0f} → {after['rss_mb']:.0f} MB."]
    table = "\n".join(lines) + "\n"
    path = run_stem(args.out, "studio-load").with_suffix(".md")
    path.write_text(table)
    print(table + f"\nbench: wrote {path}")
    return 0 if ratio >= 0.9 and after["fds"] <= baseline["fds"] and after["threads"] <= baseline["threads"] else 1


if __name__ == "__main__":
    sys.exit(main())

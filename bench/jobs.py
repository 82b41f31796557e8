"""Bulk runs: images/s (txt2img) and video frames/s (stylize), in this process and on a local Ray instance with
1 and 2 workers — what Ray costs per unit on one machine, and what a second worker brings.

Each way runs the same job into a fresh folder after its workers have loaded the model and made a first
image (their start-up, reported apart); the rate is units over the job's wall time, manifest and file writes
included. Ray gives an actor of a CPU node its share of the cores and sizes its thread pools to them
(`OMP_NUM_THREADS`): set it for the whole run to compare the ways at the same threads.

    .venv/bin/python -m bench.jobs --images 48 --size 128 --videos 2 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.report import RUNS, run_stem
from mlx_sdxs import runtime
from mlx_sdxs.backends import BackendChoice
from mlx_sdxs.jobs import plan
from mlx_sdxs.jobs.run import LocalPool, run_images, run_videos
from mlx_sdxs.jobs.work import Worker

SUBJECTS = ("a lighthouse at dusk", "a red fox in snow", "a castle on a hill", "a bowl of fruit")


def make_clip(path: Path, seconds: float, fps: int, size: tuple[int, int]) -> Path:
    """The synthetic scene as an H.264 clip (no audio: it is copied, not computed)."""
    import av

    from mlx_sdxs.camera.sources import SyntheticSource

    scene = SyntheticSource(*size, fps=fps)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        for index in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(scene.render(index), format="bgr24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


class _Kept:
    """A pool the job may not close (the bench reuses it for the next job)."""

    def __init__(self, pool):
        self.pool = pool
        self.images, self.videos = pool.images, pool.videos

    def close(self) -> None:
        pass


def timed(run, units: int) -> dict:
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    return {"units": units, "seconds": round(seconds, 3), "rate": round(units / seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random-tiny")
    parser.add_argument("--images", type=int, default=48, help="txt2img images per way")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each video")
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--render-side", type=int, default=128)
    parser.add_argument("--ways", default="local,ray1,ray2")
    parser.add_argument("--out", type=Path, default=RUNS)
    args = parser.parse_args(argv)

    choice = BackendChoice(model=args.model)
    prompts = [f"{SUBJECTS[i % len(SUBJECTS)]}, study {i}" for i in range(args.images)]
    image_job = plan.ImageJob("txt2img", args.model, (args.size, args.size), plan.txt2img_tasks(prompts, (0,)),
                              args.batch_size)
    work = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    clips = [make_clip(work / f"clip{i}.mp4", args.seconds, args.fps, (160, 96)) for i in range(args.videos)]
    video_job = plan.VideoJob(args.model, plan.video_tasks(clips), "a watercolor painting", args.render_side)
    frames = args.videos * int(args.seconds * args.fps)
    log = open(os.devnull, "w")
    results = {}
    ray = None
    for way in args.ways.split(","):
        start = time.perf_counter()
        if way == "local":
            pool = LocalPool(Worker(choice), streams=args.videos)
        else:
            import ray

            from mlx_sdxs.jobs.cluster import RayPool

            if not ray.is_initialized():
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            pool = RayPool(choice, workers=int(way.removeprefix("ray")), log=log)
            pool.pids()  # every actor has loaded its model
        kept = _Kept(pool)
        warm = plan.ImageJob("txt2img", args.model, image_job.size, plan.txt2img_tasks(["warm-up"], tuple(range(4))))
        run_images(warm, work / f"{way}-warm-up", lambda: kept, log)  # each worker's first frame compiles
        startup = time.perf_counter() - start
        images = timed(lambda: run_images(image_job, work / f"{way}-images", lambda: kept, log), args.images)
        videos = timed(lambda: run_videos(video_job, work / f"{way}-videos", lambda: kept, log), frames)
        pool.close()
        pool = kept = None  # (the next way's workers load their own models: free this one's first)
        results[way] = {"startup_s": round(startup, 2), "images": images, "video": videos}
        print(f"{way}: start-up {startup:.1f} s, {images['rate']:.2f} img/s, {videos['rate']:.2f} frames/s",
              file=sys.stderr)
    if ray is not None:
        ray.shutdown()

    local = results.get("local")
    lines = [f"Bulk runs ({args.model}: {args.images} txt2img images at {args.size}², batch {args.batch_size}; "
             f"{args.videos} videos of {args.seconds:g} s at {args.fps} fps, 160x96, render side {args.render_side}; "
             f"{runtime.describe()['device']}, {os.cpu_count()} CPUs, load average "
             f"{os.getloadavg()[0]:.1f} at the end; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})",
             "",
             "| way | start-up s | images/s | Δ ms per image vs local | video frames/s | Δ ms per frame vs local |",
             "|---|---|---|---|---|---|"]
    for way, result in results.items():
        costs = ["—", "—"]
        if local is not None and way != "local":
            costs = [f"{1000 * (result[kind]['seconds'] - local[kind]['seconds']) / result[kind]['units']:.1f}"
                     for kind in ("images", "video")]
        lines.append(f"| {way} | {result['startup_s']:.1f} | {result['images']['rate']:.2f} | {costs[0]} | "
                     f"{result['video']['rate']:.2f} | {costs[1]} |")
    table = "\n".join(lines) + "\n"
    stem = run_stem(args.out, "jobs")
    stem.with_suffix(".md").write_text(table)
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                     "results": results}, indent=1))
    print(table + f"\nbench: wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The driver of a job: skip what the manifest says is done, hand the rest to a pool of workers (this process,
or Ray actors), and commit each result as it comes — the file renamed into place, then its manifest line, with
Ctrl-C and SIGTERM held back in between. Only the driver writes to the out folder's final names."""

from __future__ import annotations

import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TextIO

from mlx_sdxs.camera.app import stop_on_sigterm
from mlx_sdxs.imageio import atomic_write_bytes
from mlx_sdxs.jobs.manifest import Manifest, held_signals, prepare_out_dir, remove_partials
from mlx_sdxs.jobs.plan import ImageJob, ImageTask, VideoJob, VideoTask
from mlx_sdxs.jobs.progress import Progress
from mlx_sdxs.jobs.video import probe
from mlx_sdxs.jobs.work import Worker

ImagesDone = Callable[[Sequence[ImageTask], list[bytes], dict[str, Any]], None]
#: A finished video: its bytes (from another host) or the partial file it was written to (here).
VideoDone = Callable[[VideoTask, "bytes | Path", dict[str, Any]], None]


class Pool(Protocol):
    """Workers holding the loaded model. `images`/`videos` return when every unit is done, calling `done` on the
    caller's thread as each one finishes (in any order)."""

    def images(self, job: ImageJob, batches: Sequence[Sequence[ImageTask]], done: ImagesDone) -> None: ...

    def videos(self, job: VideoJob, tasks: Sequence[VideoTask], partial: Callable[[VideoTask], Path],
               frames: Callable[[VideoTask, int], None], done: VideoDone) -> None: ...

    def close(self) -> None: ...


class LocalPool:
    """One worker in this process: image batches one after another; up to `streams` videos at once, as one batch."""

    def __init__(self, worker: Worker, streams: int = 1):
        self.worker, self.streams = worker, streams

    def images(self, job: ImageJob, batches: Sequence[Sequence[ImageTask]], done: ImagesDone) -> None:
        for batch in batches:
            done(batch, *self.worker.images(job, batch))

    def videos(self, job: VideoJob, tasks: Sequence[VideoTask], partial: Callable[[VideoTask], Path],
               frames: Callable[[VideoTask, int], None], done: VideoDone) -> None:
        try:
            self.worker.videos(job, tasks, partial, frames, lambda task, info: done(task, partial(task), info),
                               self.streams)
        finally:
            for task in tasks:
                partial(task).unlink(missing_ok=True)

    def close(self) -> None:
        """The model stays loaded as long as its worker."""


def batches(tasks: Sequence[ImageTask], size: int) -> list[tuple[ImageTask, ...]]:
    return [tuple(tasks[start:start + size]) for start in range(0, len(tasks), size)]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Committer:
    """The out folder's one writer: each result renamed into place, then its manifest line, signals held."""

    def __init__(self, out_dir: Path, log: TextIO):
        self.out_dir = prepare_out_dir(out_dir)
        self.manifest = Manifest(self.out_dir)  # locked first: the partial files below are no other run's
        removed = remove_partials(self.out_dir)
        if removed:
            print(f"mlx-sdxs: removed {removed} unfinished file(s) an interrupted run left in {out_dir}", file=log)
        self.written = 0

    def __enter__(self) -> "_Committer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.manifest.close()

    def commit(self, file: str, data: bytes | Path, record: dict[str, Any]) -> None:
        """`data` (bytes, or a finished partial file to rename) as `file`, then its manifest line."""
        target = self.out_dir / file
        with held_signals():
            if isinstance(data, Path):
                os.replace(data, target)
            else:
                atomic_write_bytes(target, data)
            self.manifest.add({**record, "file": file, "bytes": target.stat().st_size, "finished": _now()})
        self.written += 1


def run_images(job: ImageJob, out_dir: Path, make_pool: Callable[[], Pool], log: TextIO | None = None) -> int:
    """Every image of `job` not already in `out_dir`'s manifest; returns how many were written."""
    log = log if log is not None else sys.stderr
    with stop_on_sigterm(), _Committer(out_dir, log) as committer:
        todo = [task for task in job.tasks if not committer.manifest.done(task.file, job.identity(task))]
        skipped = len(job.tasks) - len(todo)
        if not todo:
            print(f"mlx-sdxs: all {len(job.tasks)} images are already in {out_dir} ({committer.manifest.path.name})",
                  file=log)
            return 0
        if skipped:
            print(f"mlx-sdxs: resuming: {skipped} of {len(job.tasks)} images are done, {len(todo)} to go", file=log)
        pool = make_pool()
        progress = Progress(len(job.tasks), "img", skipped, log)  # (its rate counts from the loaded model)
        try:
            def done(tasks: Sequence[ImageTask], encoded: list[bytes], info: dict[str, Any]) -> None:
                for task, data in zip(tasks, encoded):
                    committer.commit(task.file, data, {**job.identity(task), **info})
                progress.advance(len(tasks), detail=tasks[-1].file)

            pool.images(job, batches(todo, job.batch_size), done)
        finally:
            pool.close()
        progress.close(f"{committer.written} images written to {out_dir} ({progress.rate:.2f} img/s)")
    return committer.written


def run_videos(job: VideoJob, out_dir: Path, make_pool: Callable[[], Pool], log: TextIO | None = None) -> int:
    """Every video of `job` not already in `out_dir`'s manifest; returns how many were written."""
    log = log if log is not None else sys.stderr
    frames = {task.file: probe(task.input)["frames"] for task in job.tasks}  # unreadable files stop us here
    with stop_on_sigterm(), _Committer(out_dir, log) as committer:
        todo = [task for task in job.tasks if not committer.manifest.done(task.file, job.identity(task))]
        waiting = {task.file for task in todo}
        done_frames = sum(count for file, count in frames.items() if file not in waiting)
        if not todo:
            print(f"mlx-sdxs: all {len(job.tasks)} videos are already in {out_dir}", file=log)
            return 0
        if len(todo) < len(job.tasks):
            print(f"mlx-sdxs: resuming: {len(job.tasks) - len(todo)} of {len(job.tasks)} videos are done", file=log)
        pool = make_pool()
        progress = Progress(sum(frames.values()), "frames", done_frames, log)
        counts: dict[str, int] = {}
        try:
            def advance(task: VideoTask, count: int) -> None:
                counts[task.file] = count  # a count, not a step: a retried video starts again from 0
                progress.set(done_frames + sum(counts.values()), detail=f"{task.file} {count}/{frames[task.file]}")

            def done(task: VideoTask, data: bytes | Path, info: dict[str, Any]) -> None:
                committer.commit(task.file, data, {**job.identity(task), **info, "input_frames": frames[task.file]})
                advance(task, frames[task.file])
                progress.note(f"{task.file}: {info['frames']} frames in {info['seconds']:.1f} s")

            pool.videos(job, todo, lambda task: committer.out_dir / f".{Path(task.file).stem}.partial.mp4",
                        advance, done)
        finally:
            pool.close()
        progress.close(f"{committer.written} videos written to {out_dir} ({progress.rate:.2f} frames/s)")
    return committer.written

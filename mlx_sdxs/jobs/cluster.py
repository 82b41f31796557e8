"""A job's pool on a Ray cluster (`--ray [ADDRESS]`, the `ray` extra): one actor per device, each holding the
loaded model — `num_gpus=1` where the cluster has GPUs, else one per node (MLX uses every core of a CPU).
Image batches are handed out as actors free up; each video goes whole to one actor. Results come back to the
driver, the only writer of the out folder. An actor whose process dies is restarted (its model loaded again)
and its unfinished unit retried by Ray; the driver commits each file once."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from mlx_sdxs import runtime
from mlx_sdxs.backends import BackendChoice
from mlx_sdxs.errors import SDXSError
from mlx_sdxs.jobs.plan import ImageJob, ImageTask, VideoJob, VideoTask
from mlx_sdxs.jobs.work import Worker

#: Restarts of a dead actor, and retries of the unit it held (each dies with the process it ran in).
RESTARTS = 3
#: Units queued per actor: one running and one waiting, so an actor never idles between units.
IN_FLIGHT = 2
#: How often the driver looks for finished units and frame counts (seconds).
POLL_S = 0.25
LOCAL = "local"


class _Actor:
    """A `Worker` inside a Ray actor process."""

    def __init__(self, choice: BackendChoice):
        runtime.select_kernels(choice.kernels)
        self.worker = Worker(choice)

    def pid(self) -> int:
        return os.getpid()

    def images(self, job: ImageJob, tasks: Sequence[ImageTask]) -> tuple[list[bytes], dict[str, Any]]:
        return self.worker.images(job, tasks)

    def video(self, job: VideoJob, task: VideoTask, counter) -> tuple[bytes, dict[str, Any]]:
        return self.worker.video_bytes(job, task, lambda count: counter.set.remote(task.file, count))


class _Counter:
    """Frames done per video, reported by the actors (fire and forget) and read by the driver."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def set(self, key: str, count: int) -> None:
        self.counts[key] = count

    def read(self) -> dict[str, int]:
        return dict(self.counts)


def require_ray():
    try:
        import ray
    except ImportError:
        raise SDXSError("--ray needs Ray: pip install 'mlx-sdxs[ray]'") from None
    return ray


class RayPool:
    """`workers` actors (default: one per GPU, else one per node) on the cluster at `address` (`LOCAL`: a Ray
    instance started here and shut down by `close`; an instance this process already joined is used as is)."""

    def __init__(self, choice: BackendChoice, address: str = LOCAL, workers: int | None = None,
                 log: TextIO | None = None):
        ray = require_ray()
        self._ray, self._log = ray, log if log is not None else sys.stderr
        self._owned = not ray.is_initialized()
        if self._owned:
            on_sigterm = signal.getsignal(signal.SIGTERM)
            try:
                ray.init(address=None if address == LOCAL else address, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise SDXSError(f"--ray {address}: cannot join the Ray cluster ({exc})") from None
            if threading.current_thread() is threading.main_thread():
                # Ray's driver makes SIGTERM a bare exit; the job's own handler stops it as Ctrl-C does.
                signal.signal(signal.SIGTERM, on_sigterm)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        nodes = len([node for node in ray.nodes() if node.get("Alive")])
        count = workers or gpus or nodes
        # On CPUs an actor takes its share of a node's cores: Ray sizes its BLAS/OpenMP thread pools to them
        # (1 CPU would make MLX's matrix products single-threaded).
        cpus = max(1, int(resources.get("CPU", 1)) // max(count, nodes))
        options = {"num_gpus": 1} if gpus else {"num_cpus": cpus}
        actor = ray.remote(max_restarts=RESTARTS, max_task_retries=RESTARTS)(_Actor)
        self.actors = [actor.options(**options).remote(choice) for _ in range(count)]
        self._counter = ray.remote(_Counter).remote()
        where = "a local Ray instance" if self._owned and address == LOCAL else f"Ray at {address}"
        print(f"mlx-sdxs: {count} worker(s) on {where} ({'1 GPU' if gpus else f'{cpus} CPUs'} each)", file=self._log)

    def pids(self) -> list[int]:
        """Each actor's process id (tests kill one)."""
        return self._ray.get([actor.pid.remote() for actor in self.actors])

    def _run(self, units: Sequence, submit: Callable[[Any, Any], Any], finished: Callable[[Any, Any], None],
             poll: Callable[[], None] | None = None) -> None:
        """Every unit through `submit(actor, unit)`, at most `IN_FLIGHT` per actor, `finished(unit, result)` as
        each comes back."""
        ray = self._ray
        queue = list(units)[::-1]
        running: dict[Any, tuple[Any, Any]] = {}
        load = {index: 0 for index in range(len(self.actors))}
        while queue or running:
            for index in load:
                while queue and load[index] < IN_FLIGHT:
                    unit = queue.pop()
                    running[submit(self.actors[index], unit)] = (index, unit)
                    load[index] += 1
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
            if poll is not None:
                poll()
            for ref in ready:
                index, unit = running.pop(ref)
                load[index] -= 1
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    raise SDXSError(f"a Ray worker died {RESTARTS + 1} times on one unit: {_cause(exc)}") from None
                except ray.exceptions.RayTaskError as exc:  # the worker's own error (a bad input): as it said
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), SDXSError) else None
                    raise cause or SDXSError(f"a Ray worker failed: {_cause(exc)}") from None
                finished(unit, result)

    def images(self, job: ImageJob, batches: Sequence[Sequence[ImageTask]], done) -> None:
        self._run(batches, lambda actor, batch: actor.images.remote(job, batch),
                  lambda batch, result: done(batch, *result))

    def videos(self, job: VideoJob, tasks: Sequence[VideoTask], partial: Callable[[VideoTask], Path],
               frames: Callable[[VideoTask, int], None], done) -> None:
        by_file = {task.file: task for task in tasks}

        def poll() -> None:
            for file, count in self._ray.get(self._counter.read.remote()).items():
                frames(by_file[file], count)

        self._run(tasks, lambda actor, task: actor.video.remote(job, task, self._counter),
                  lambda task, result: done(task, *result), poll)

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self._ray.kill(self._counter)
        if self._owned:
            self._ray.shutdown()


def _cause(exc: Exception) -> str:
    cause = getattr(exc, "cause", None)
    return str(cause if cause is not None else exc).strip().splitlines()[-1]

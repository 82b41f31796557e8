"""The worker side of a job: a loaded model and what it renders — encoded images for the driver to write,
a stylised video into a file. The same code runs in this process and in each Ray actor, so a cluster's
outputs are the local run's."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mlx_sdxs.backends import BackendChoice, load_pipeline
from mlx_sdxs.camera.presenter import labelled
from mlx_sdxs.imageio import encode_image, read_image
from mlx_sdxs.jobs.plan import ImageJob, ImageTask, VideoJob, VideoTask
from mlx_sdxs.jobs.video import stylize_videos


def render_images(pipeline, job: ImageJob, tasks: Sequence[ImageTask]) -> list[np.ndarray]:
    """The RGB images of `tasks`, in order, from one batched pipeline call (each the image its single call makes)."""
    control = {}
    if job.control_image is not None:
        control = {"control_image": job.control_image, "control_strength": job.control_strength}
    prompts, seeds = [task.prompt for task in tasks], [task.seed for task in tasks]
    if job.kind == "txt2img":
        return pipeline.txt2img(prompts, seed=seeds, size=job.size, batch_size=len(tasks), **control)
    return pipeline.img2img([read_image(task.input) for task in tasks], prompts, strength=job.strength, seed=seeds,
                            size=job.size, batch_size=len(tasks), **control)


class Worker:
    """One loaded model; `images` and `video` are the units a driver hands out."""

    def __init__(self, choice: BackendChoice):
        self.pipeline = load_pipeline(choice)

    def images(self, job: ImageJob, tasks: Sequence[ImageTask]) -> tuple[list[bytes], dict[str, Any]]:
        """`tasks`' images, labelled when the weights are random, encoded as their files' formats; and what the
        manifest records of the batch (the loaded model's name, seconds per image)."""
        start = time.perf_counter()
        images = render_images(self.pipeline, job, tasks)
        seconds = (time.perf_counter() - start) / max(1, len(tasks))
        encoded = [encode_image(task.file, labelled(image, self.pipeline.label)) for task, image in zip(tasks, images)]
        return encoded, {"model_name": self.pipeline.name, "seconds": round(seconds, 4)}

    def videos(self, job: VideoJob, tasks: Sequence[VideoTask], dest: Callable[[VideoTask], Path],
               progress: Callable[[VideoTask, int], None], done: Callable[[VideoTask, dict[str, Any]], None],
               streams: int = 1) -> None:
        """`tasks` stylised into `dest(task)`, up to `streams` at once as one batch; `progress(task, frames
        written)`, `done(task, info)` as each file is closed."""
        start, counts = time.perf_counter(), [0] * len(tasks)

        def advance(index: int, step: int) -> None:
            counts[index] += step
            progress(tasks[index], counts[index])

        def finished(index: int, info: dict[str, Any]) -> None:
            done(tasks[index], {**info, "model_name": self.pipeline.name,
                                "seconds": round(time.perf_counter() - start, 3)})

        stylize_videos(self.pipeline, job, [(task.input, dest(task)) for task in tasks], advance, finished, streams)

    def video_bytes(self, job: VideoJob, task: VideoTask,
                    progress: Callable[[int], None] | None = None) -> tuple[bytes, dict[str, Any]]:
        """The stylised video as bytes, for a driver on another host (made in a temporary folder here)."""
        infos: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="mlx-sdxs-stylize-") as folder:
            dest = Path(folder) / task.file
            self.videos(job, [task], lambda task: dest, lambda task, count: progress and progress(count),
                        lambda task, info: infos.append(info))
            return dest.read_bytes(), infos[0]

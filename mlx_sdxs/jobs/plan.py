"""What a job makes, decided before any model loads: its inputs (prompt files, seed ranges, image files and
folders, videos), one task per output, and each output's file name — deterministic, so a rerun finds them."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlx_sdxs.errors import SDXSError
from mlx_sdxs.recipe import DEFAULT_CONTROL_STRENGTH

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
#: The most seeds one `--seeds` may name (a typo such as 0-100000000 is refused, not planned).
MAX_SEEDS = 100_000
SLUG_CHARS = 40


def seed_list(text: str) -> tuple[int, ...]:
    """argparse type for `--seeds`: "0-3", "0,5,9" or both ("0-3,9"); ranges inclusive, no repeats."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise argparse.ArgumentTypeError(f"--seeds must look like 0-3 or 0,5,9, got {text!r}")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise argparse.ArgumentTypeError(f"--seeds range {part.strip()} ends before it starts")
        if len(seeds) + high - low + 1 > MAX_SEEDS:
            raise argparse.ArgumentTypeError(f"--seeds names more than {MAX_SEEDS:,} seeds")
        seeds += range(low, high + 1)
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds names a seed twice: {text!r}")
    return tuple(seeds)


def slug(text: str) -> str:
    """A file-name-safe short form of a prompt: lower-case words joined by '-'."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return "-".join(words)[:SLUG_CHARS].rstrip("-") or "prompt"


@dataclass(frozen=True)
class ImageTask:
    """One output image: its file name in the out folder, prompt, seed and (img2img) input file."""

    file: str
    prompt: str
    seed: int
    input: str | None = None


@dataclass(frozen=True)
class ImageJob:
    """Every image of one `txt2img`/`img2img` run and the settings they share."""

    kind: str
    model: str
    size: tuple[int, int]
    tasks: tuple[ImageTask, ...]
    batch_size: int = 1
    strength: float | None = None
    control_image: np.ndarray | None = field(default=None, compare=False)
    control_file: str | None = None
    control_strength: float | None = None

    def identity(self, task: ImageTask) -> dict[str, Any]:
        """What makes `task`'s image what it is: its manifest record (less timings), checked on a rerun."""
        record = {"kind": self.kind, "prompt": task.prompt, "seed": task.seed, "model": self.model,
                  "size": f"{self.size[0]}x{self.size[1]}"}
        if task.input is not None:
            record["input"] = task.input
        if self.strength is not None:
            record["strength"] = self.strength
        if self.control_file is not None:
            record.update(control_image=self.control_file, control_strength=self.control_strength)
        return record


def txt2img_tasks(prompts: list[str], seeds: tuple[int, ...]) -> tuple[ImageTask, ...]:
    """Every prompt × seed, prompt-major; named `NNNNN-<prompt words>-sSEED.png` (NNNNN: the prompt's place)."""
    width = max(5, len(str(len(prompts))))
    return tuple(ImageTask(f"{index:0{width}d}-{slug(prompt)}-s{seed}.png", prompt, seed)
                 for index, prompt in enumerate(prompts, 1) for seed in seeds)


def image_inputs(paths: list[Path]) -> list[Path]:
    """The image files named, folders expanded to their images (sorted, not recursive)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise SDXSError(f"{path}: no images in this folder ({', '.join(IMAGE_SUFFIXES)})")
            found += images
        elif path.is_file():
            found.append(path)
        else:
            raise SDXSError(f"{path}: no such file or folder")
    return found


def img2img_tasks(inputs: list[Path], prompts: list[str], seeds: tuple[int, ...]) -> tuple[ImageTask, ...]:
    """Every input × prompt × seed; named `<input stem>[-pNNN]-sSEED.png` (-pNNN only with several prompts)."""
    stems: dict[str, Path] = {}
    for path in inputs:
        if path.stem in stems and stems[path.stem].resolve() != path.resolve():
            raise SDXSError(f"two inputs would write the same outputs: {stems[path.stem]} and {path}; rename one")
        stems.setdefault(path.stem, path)
    tasks = []
    for stem, path in stems.items():
        for index, prompt in enumerate(prompts, 1):
            tag = f"-p{index:03d}" if len(prompts) > 1 else ""
            tasks += [ImageTask(f"{stem}{tag}-s{seed}.png", prompt, seed, str(path.resolve())) for seed in seeds]
    return tuple(tasks)


@dataclass(frozen=True)
class VideoTask:
    file: str
    input: str


@dataclass(frozen=True)
class VideoJob:
    """Every video of one `stylize` run and the camera recipe's settings they share."""

    model: str
    tasks: tuple[VideoTask, ...]
    prompt: str
    render_side: int
    prompt_b: str | None = None
    prompt_blend: float = 0.0
    seed: int = 42
    seed_b: int | None = None
    seed_blend: float = 0.0
    feedback: float = 0.1
    strength: float | None = None
    control: str = "edges"
    control_strength: float = DEFAULT_CONTROL_STRENGTH

    def identity(self, task: VideoTask) -> dict[str, Any]:
        """What makes `task`'s video what it is (the control knobs count only for a ControlNet model, but the
        model is not loaded when this is checked)."""
        record = {"kind": "stylize", "input": task.input, "model": self.model, "prompt": self.prompt,
                  "render_side": self.render_side, "seed": self.seed, "feedback": self.feedback,
                  "control": self.control, "control_strength": self.control_strength}
        optional = {"prompt_b": self.prompt_b, "prompt_blend": self.prompt_blend if self.prompt_b else None,
                    "seed_b": self.seed_b, "seed_blend": self.seed_blend if self.seed_b is not None else None,
                    "strength": self.strength}
        record.update({key: value for key, value in optional.items() if value is not None})
        return record


def video_tasks(paths: list[Path]) -> tuple[VideoTask, ...]:
    """One task per video file, named `<stem>.mp4`; missing files and clashing names are errors."""
    tasks: dict[str, VideoTask] = {}
    for path in paths:
        if not path.is_file():
            raise SDXSError(f"{path}: no such video file")
        name = f"{path.stem}.mp4"
        if name in tasks:
            raise SDXSError(f"two videos would write {name}: {tasks[name].input} and {path}; rename one")
        tasks[name] = VideoTask(name, str(path.resolve()))
    return tuple(tasks.values())


def render_size_for(video_size: tuple[int, int], side: int, multiple: int = 64) -> tuple[int, int]:
    """The render size of a video: its aspect, the longer side `side`, both sides multiples of `multiple`."""
    width, height = video_size
    long, short = max(width, height), min(width, height)
    short_side = max(multiple, round(side * short / long / multiple) * multiple)
    return (side, short_side) if width >= height else (short_side, side)

"""What every bench measures on: the frames, the prompt, and the weights (a diffusers checkpoint and its MLX
conversion, random in a preset's shape unless `--checkpoint` names one)."""

from __future__ import annotations

from pathlib import Path

PROMPT = "a watercolor painting"
#: The row suffix of a backend running a ControlNet model (its frame: control image → ControlNet + UNet → decode).
CONTROLNET_SUFFIX = "+controlnet"
#: The loop's replay source runs far above any model's rate, so the loop FPS says what the loop can do (a 30 FPS
#: camera would cap every backend at 30); paced, not spinning, so it takes almost no CPU itself.
UNPACED_FPS = 1000.0


def load_frames(folder: Path | None) -> tuple[list, str]:
    """The frames every backend is fed: `folder`'s photos, else ../shared/data/images, else the synthetic scene."""
    import cv2

    from mlx_sdxs.camera.sources import DEFAULT_SIZE, SyntheticSource

    given = folder is not None
    folder = folder or Path(__file__).resolve().parents[2] / "shared" / "data" / "images"
    files = sorted(f for f in folder.glob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg")) if folder.is_dir() else []
    frames = [frame for frame in (cv2.imread(str(f)) for f in files) if frame is not None]
    if given and not frames:
        raise SystemExit(f"bench: --images {folder}: no readable .png/.jpg images there")
    if frames:
        return frames, f"{len(frames)} photos from {folder}"
    source = SyntheticSource(*DEFAULT_SIZE, 0)
    return [source.read() for _ in range(8)], "8 frames of the synthetic scene"


def prepare_variants(preset: str, checkpoint: Path | None = None) -> dict[str, tuple[Path, Path]]:
    """Row suffix → (diffusers checkpoint, converted folder). A preset that adds a ControlNet (e.g.
    sdxs-512-dreamshaper-sketch) gives two: its base model ("", the plain frame) and the model with its
    ControlNet (CONTROLNET_SUFFIX), so that every backend's ControlNet frame stands beside its plain one."""
    from mlx_sdxs import presets

    if checkpoint is not None:
        suffix = CONTROLNET_SUFFIX if presets.controlnet_folder(checkpoint) is not None else ""
        return {suffix: prepare_checkpoint(preset, checkpoint)}
    base = presets.base(preset)
    if base is None:
        return {"": prepare_checkpoint(preset)}
    return {"": prepare_checkpoint(base), CONTROLNET_SUFFIX: prepare_checkpoint(preset)}


def prepare_checkpoint(preset: str, checkpoint: Path | None = None) -> tuple[Path, Path]:
    """(diffusers checkpoint, converted MLX folder): `checkpoint`, else random weights in `preset`'s shape;
    built and converted once under the weights folder."""
    from mlx_sdxs import hub
    from mlx_sdxs.backends import random_checkpoint
    from mlx_sdxs.convert import convert_checkpoint

    source = checkpoint or random_checkpoint(preset)
    converted = hub.default_weights_root() / f"bench-{hub.model_slug(source)}-float32"
    if not hub.is_converted(converted):
        print(f"bench: converting {source} for MLX (once)…", flush=True)
        convert_checkpoint(source, converted)
    return source, converted


class ReplaySource:
    """Decoded frames replayed at a fixed rate: the loop measurement pays no decode/synthesis cost."""

    def __init__(self, frames: list, fps: float = UNPACED_FPS):
        from mlx_sdxs.camera.sources import Pacer

        self.name, self.fps, self.frames, self.count, self.pacer = "replay", fps, frames, 0, Pacer(fps)

    def read(self, stop=None):
        if not self.pacer.wait(stop):
            return None
        self.count += 1
        return self.frames[self.count % len(self.frames)]

    def close(self) -> None:
        pass

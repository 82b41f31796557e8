"""Engines for exported graphs (ONNX Runtime, CoreML), and the export folder's manifest.

Such an engine supplies three calls on NCHW float32 numpy arrays — `_run("vae_encoder", …)`,
`_run("unet", …)`, `_run("vae_decoder", …)` — and encodes prompts with the source checkpoint's CLIP
in PyTorch (once per prompt, so its speed is moot). The recipe itself is `mlx_sdxs.recipe`.

Exported folders (`mlx-sdxs export coreml|onnx`) carry a `manifest.json` described by
`ExportManifest`; their graphs take and return UNet-space latents (VAE scaling applied inside).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from mlx_sdxs import presets
from mlx_sdxs.errors import ConfigError
from mlx_sdxs.frames import Size, as_size
from mlx_sdxs.recipe import HostFrames, RecipeSettings
from mlx_sdxs.scheduler import OneStepScheduler, SchedulerConfig

MANIFEST_FILE = "manifest.json"
#: Graph input/output names, identical in the CoreML and ONNX exports.
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
#: A ControlNet model's UNet graph (ControlNet + UNet in one) takes these too: the control image (RGB in [0, 1])
#: and its strength, shape (1,).
CONTROL_INPUTS = ("controlnet_cond", "conditioning_scale")
UNET_OUTPUT = "noise_pred"
ENCODER_INPUT, ENCODER_OUTPUT = "image", "latents"
DECODER_INPUT, DECODER_OUTPUT = "latents", "image"

#: Prompt → (CLIP embeddings (1, 77, D) float32, whether the prompt was cut to fit), from one tokenisation.
PromptEncoder = Callable[[str], tuple[np.ndarray, bool]]
#: What `mlx-sdxs export coreml --precision` accepts (here, where no torch or coremltools is imported).
COREML_PRECISIONS = ("float16", "float32")
#: Each side of an exported graph's (static) render size: a multiple of 64 in this range. Checked here, where
#: no torch is imported, so a bad size is refused before an export or a comparison backend loads anything.
EXPORT_SIDES = (256, 1024)


def check_export_size(render_size: int | Size) -> Size:
    """`render_size` as (width, height), or a ConfigError saying which sizes an export can have."""
    width, height = as_size(render_size)
    low, high = EXPORT_SIDES
    if any(side % 64 or not low <= side <= high for side in (width, height)):
        raise ConfigError(f"render size sides must be multiples of 64 from {low} to {high} for an exported "
                          f"graph (ONNX, CoreML), got {width}x{height}")
    return width, height


@dataclass
class ExportManifest:
    """What an export folder holds and where the parts it does not hold (text encoder, scheduler) live."""

    format: str  # "coreml" or "onnx"
    #: (width, height): graphs have static shapes.
    render_size: list[int]
    precision: str
    latent_channels: int
    text_dim: int
    #: The source diffusers checkpoint: its tokenizer/ text_encoder/ scheduler/ are used from there.
    checkpoint: str
    #: component ("unet", "vae_encoder", "vae_decoder") → file name inside the export folder.
    files: dict[str, str] = field(default_factory=dict)
    inputs: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    outputs: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    latents_scaled: bool = True
    #: The ControlNet folder exported inside the UNet graph (which then takes `CONTROL_INPUTS`), if any.
    controlnet: str | None = None

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path, expected_format: str) -> "ExportManifest":
        path = Path(folder) / MANIFEST_FILE
        if not path.is_file():
            raise ConfigError(f"{path}: missing (export with `mlx-sdxs export {expected_format} CHECKPOINT {folder}`)")
        try:
            manifest = cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"{path}: not a valid export manifest ({exc})") from None
        if manifest.format != expected_format:
            raise ConfigError(f"{path}: format is {manifest.format!r}, expected {expected_format!r}")
        if isinstance(manifest.render_size, int):  # exports before non-square sizes
            manifest.render_size = [manifest.render_size, manifest.render_size]
        return manifest

    def check_size(self, folder: Path, settings: RecipeSettings) -> None:
        """Exported graphs have one static shape: refuse another render size, saying how to get it."""
        if tuple(self.render_size) != settings.render_size:
            have, want = "x".join(map(str, self.render_size)), settings.describe_size()
            raise ConfigError(f"{folder}: exported for render size {have}, the stream asks for {want} "
                              f"(a fixed-shape export); re-export it at render size {want}")

    def checkpoint_dir(self, override: str | Path | None) -> Path:
        """The source checkpoint (or `override`), checked to still hold what the backend reads from it."""
        folder = Path(override) if override is not None else Path(self.checkpoint)
        for part in ("tokenizer", "text_encoder", "scheduler/scheduler_config.json"):
            if not (folder / part).exists():
                raise ConfigError(f"{folder / part}: missing; pass checkpoint_dir= pointing at the diffusers "
                                  f"checkpoint the export came from (manifest 'checkpoint': {self.checkpoint})")
        return folder


class ExportedEngine(HostFrames):
    """Recipe engine over three exported graphs; subclasses implement `_run(component, feeds)`. The graphs
    are exported at batch 1: a group's streams run one after another."""

    batch_sizes = (1,)

    def __init__(self, export_dir: str | Path, export_format: str, settings: RecipeSettings,
                 checkpoint_dir: str | Path | None = None, prompt_encoder: PromptEncoder | None = None):
        """Read `export_dir`'s manifest (checked against `settings`); the text encoder and scheduler come from
        the source checkpoint it names (or `checkpoint_dir`)."""
        self.export_dir = Path(export_dir)
        self.manifest = ExportManifest.load(self.export_dir, export_format)
        self.manifest.check_size(self.export_dir, settings)
        checkpoint = self.manifest.checkpoint_dir(checkpoint_dir)
        self.label = presets.weights_label(checkpoint)
        self.scheduler = OneStepScheduler(SchedulerConfig.from_file(checkpoint / "scheduler" / "scheduler_config.json"))
        self.latent_channels = self.manifest.latent_channels
        if prompt_encoder is None:
            from mlx_sdxs.backends.torch_backend import ClipPromptEncoder

            prompt_encoder = ClipPromptEncoder(checkpoint)
        self.prompt_encoder = prompt_encoder

    def _run(self, component: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def check_thread(self) -> None:
        """Exported runtimes take calls from any thread."""

    def from_nhwc(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array.transpose(0, 3, 1, 2), dtype=np.float32)

    def to_nhwc(self, array: np.ndarray) -> np.ndarray:
        return array.transpose(0, 2, 3, 1)

    def encode(self, image: np.ndarray) -> np.ndarray:
        return self._run("vae_encoder", {ENCODER_INPUT: image})

    @property
    def controlled(self) -> bool:
        return CONTROL_INPUTS[0] in self.manifest.inputs.get("unet", {})

    def predict_noise(self, noisy: np.ndarray, timestep: int, embeds: np.ndarray, control=None) -> np.ndarray:
        """`embeds` is the conditioning (`condition` keeps the embeddings as they are); `control` (image in
        [0, 1], strength) feeds an export that holds its ControlNet."""
        feeds = (np.ascontiguousarray(noisy, dtype=np.float32), np.array([timestep], np.float32), embeds)
        if control is not None:
            feeds += (np.ascontiguousarray(control[0], dtype=np.float32), np.asarray(control[1], np.float32).reshape(1))
        return self._run("unet", dict(zip(UNET_INPUTS + CONTROL_INPUTS, feeds)))

    def decode(self, latent: np.ndarray) -> np.ndarray:
        return self._run("vae_decoder", {DECODER_INPUT: np.ascontiguousarray(latent, dtype=np.float32)})

    def encode_prompt(self, prompt: str) -> tuple[np.ndarray, bool]:
        embeds, truncated = self.prompt_encoder(prompt)
        return np.asarray(embeds, dtype=np.float32), truncated

    def from_embeds(self, embeds: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(embeds, dtype=np.float32)

    def sync(self, arrays: Sequence[np.ndarray]) -> None:
        """Every call is synchronous."""

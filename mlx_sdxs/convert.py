"""Diffusers checkpoint folder → MLX weights folder, once, offline, without PyTorch.

Layout written (`dst`):
    model_index.json, mlx_sdxs.json (what was converted, from where, in which dtype)
    unet/ vae/ text_encoder/      config.json + model.safetensors (MLX layout, see `weights`)
    controlnet/                   the same, for a model with a ControlNet (SDXS-512-DreamShaper Sketch)
    tokenizer/ scheduler/         copied as they are (the tokenizer checked to load: tokenizer.json, as
                                  transformers 5 saves it, or vocab.json + merges.txt)

Everything is written into a sibling temp folder and renamed into place at the end, so an
interrupted conversion (Ctrl-C, disk full) never leaves a half-written `dst`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from mlx_sdxs import presets
from mlx_sdxs import weights as W
from mlx_sdxs.errors import SDXSError, WeightsError
from mlx_sdxs.runtime import DTYPES
from mlx_sdxs.tokenizer import load_tokenizer

# No tqdm monitor thread: a conversion is one pass, and threads must not outlive the work that made them.
tqdm.monitor_interval = 0
MODEL_COMPONENTS = ("unet", "vae", "text_encoder")
COPIED_COMPONENTS = ("tokenizer", "scheduler")
MANIFEST = "mlx_sdxs.json"


def _checkpoint_files(src: Path) -> list[Path]:
    """The safetensors files of one diffusers/transformers component (single file or sharded)."""
    for index_name in ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json"):
        index = src / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [src / shard for shard in shards]
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (src / name).is_file():
            return [src / name]
    pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.ckpt"))
    if pickles:
        raise WeightsError(
            f"{src}: only PyTorch pickle weights ({', '.join(pickles)}); mlx-sdxs never unpickles files. "
            "Re-save the checkpoint as safetensors (diffusers: `save_pretrained(..., safe_serialization=True)`) "
            "or download the .safetensors variant."
        )
    raise WeightsError(f"{src}: no .safetensors weights found")


def convert_component(src: str | Path, dst: str | Path, component: str, dtype: str = "float32") -> Path:
    """Convert one component folder (config.json + safetensors) into `dst` (written atomically)."""
    dst = Path(dst)
    with atomic_dir(dst) as tmp:
        _write_component(Path(src), tmp, component, dtype)
    return dst


def _write_component(src: Path, out: Path, component: str, dtype: str) -> None:
    """Validate and convert one component into the existing folder `out` (the caller makes it atomic)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    model = W.build_model_from(src, component)
    expected = W.expected_shapes(model)

    converted: dict[str, mx.array] = {}
    origin: dict[str, str] = {}
    for file in _checkpoint_files(src):
        tensors, _ = W.read_safetensors(file)
        # A bar on a terminal (tqdm comes with huggingface-hub); each tensor is converted as it is counted.
        for key, value in tqdm(tensors.items(), desc=f"converting {component}", unit="tensor", disable=None,
                               leave=False):
            new_key = W.map_key(component, key)
            if new_key is None:
                continue
            if new_key in converted:
                raise WeightsError(f"{file}: keys {origin[new_key]!r} and {key!r} both map to {new_key!r}")
            value = W.adapt_layout(value, expected.get(new_key, tuple(value.shape)))
            if mx.issubdtype(value.dtype, mx.floating):
                value = value.astype(DTYPES[dtype])
            mx.eval(value)
            converted[new_key], origin[new_key] = value, key
    W.check_tensors(converted, model, str(src))

    metadata = {"format": W.FORMAT_NAME, "format_version": str(W.FORMAT_VERSION), "dtype": dtype}
    try:
        mx.save_safetensors(str(out / W.WEIGHTS_FILE), converted, metadata=metadata)
    except RuntimeError as exc:  # MLX reports a failed write (disk full, I/O error) as RuntimeError
        raise OSError(f"{component}/{W.WEIGHTS_FILE}: {exc}") from None
    shutil.copy2(src / W.CONFIG_FILE, out / W.CONFIG_FILE)


def convert_checkpoint(src: str | Path, dst: str | Path, dtype: str = "float32", vae: str | Path | None = None,
                       controlnet: str | Path | None = None) -> Path:
    """Convert a diffusers checkpoint folder (model_index.json + components) into an MLX weights folder.

    `vae`: another VAE component folder to use instead of the checkpoint's (e.g. TAESD for a KL model).
    `controlnet`: a ControlNet folder (config.json + safetensors) to convert beside the model; a checkpoint's
    own `controlnet/` folder is taken when there is none.
    """
    src, dst = Path(src), Path(dst)
    sources = {component: src / component for component in (*MODEL_COMPONENTS, *COPIED_COMPONENTS)}
    if vae is not None:
        sources["vae"] = Path(vae)
    controlnet = Path(controlnet) if controlnet is not None else presets.controlnet_folder(src)
    if controlnet is not None:
        sources[presets.CONTROLNET] = controlnet
    converted = [c for c in (*MODEL_COMPONENTS, *presets.OPTIONAL_COMPONENTS) if c in sources]
    if not (src / "model_index.json").is_file():
        raise WeightsError(f"{src}: not a diffusers checkpoint (no model_index.json)")
    missing = [str(folder) for folder in sources.values() if not folder.is_dir()]
    if missing:
        raise WeightsError(f"{src}: checkpoint lacks component folder(s): {', '.join(missing)}")
    load_tokenizer(sources["tokenizer"])  # a tokenizer the pipeline could not read is refused before any work
    with atomic_dir(dst) as tmp:
        for component in converted:
            (tmp / component).mkdir()
            _write_component(sources[component], tmp / component, component, dtype)
        for component in COPIED_COMPONENTS:
            shutil.copytree(sources[component], tmp / component)
        shutil.copy2(src / "model_index.json", tmp / "model_index.json")
        manifest = {"format": W.FORMAT_NAME, "format_version": W.FORMAT_VERSION, "dtype": dtype, "source": str(src),
                    "vae": str(sources["vae"]), "controlnet": str(controlnet) if controlnet is not None else None}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return dst


class atomic_dir:
    """Context manager yielding a temp folder beside `dst` that replaces `dst` only on success."""

    def __init__(self, dst: Path):
        self.dst = dst

    def __enter__(self) -> Path:
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.dst.with_name(f".{self.dst.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        self.tmp.mkdir()  # the umask's usual mode: mkdtemp's 0700 would hide the weights from other users
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError):  # disk full, permissions: name the destination, not the temp folder
                file = f" ({str(exc.filename).replace(str(self.tmp), str(self.dst))})" if exc.filename else ""
                raise SDXSError(f"{self.dst}: not written: {exc.strerror or exc}{file}") from None
            return
        old = None
        if self.dst.exists():
            old = self.dst.with_name(f".{self.dst.name}.old-{os.getpid()}")
            os.replace(self.dst, old)
        os.replace(self.tmp, self.dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

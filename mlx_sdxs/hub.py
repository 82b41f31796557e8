"""Where a model comes from: a Hub repo id, a local diffusers checkpoint, or a converted `weights/` folder.

Hub repos are fetched with huggingface-hub (its cache, its progress bars; only configs, tokenizer
files and `.safetensors` weights), converted once into `weights/<repo>-<dtype>/`, and reused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlx_sdxs import convert as C
from mlx_sdxs.runtime import DTYPES
from mlx_sdxs.errors import SDXSError, WeightsError

DEFAULT_MODEL = "IDKiro/sdxs-512-0.9"
KNOWN_MODELS = ("IDKiro/sdxs-512-0.9", "IDKiro/sdxs-512-dreamshaper", "stabilityai/sd-turbo")

# Only what mlx-sdxs reads: configs, tokenizer files and full-precision safetensors (no .bin, no
# fp16 variants, no safety checker / feature extractor).
_ALLOW = [
    "model_index.json", "config.json", "*/config.json", "tokenizer/*", "scheduler/*",
    "*/diffusion_pytorch_model.safetensors", "*/model.safetensors", "*/*.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
]
_IGNORE = ["safety_checker/*", "feature_extractor/*", "*.fp16.safetensors", "*.bin", "*.ckpt", "*.onnx*"]


def default_weights_root() -> Path:
    """`$MLX_SDXS_WEIGHTS`, else `./weights` (the project layout's folder)."""
    return Path(os.environ.get("MLX_SDXS_WEIGHTS", "weights"))


def is_converted(path: Path) -> bool:
    return (path / C.MANIFEST).is_file()


def is_diffusers_checkpoint(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def _slug(model: str) -> str:
    return model.strip("/").replace("/", "--")


def model_slug(folder: Path) -> str:
    """A checkpoint folder's name for what is made from it: the repo (`org--name`) for a Hugging Face
    cache snapshot (`…/models--org--name/snapshots/<hash>`), else the folder's own name."""
    folder = Path(folder).resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.removeprefix("models--")
    return folder.name


def converted_dtype(folder: Path) -> str | None:
    """The dtype a converted folder stores (its manifest's), None for a folder that is not one."""
    return _manifest(folder).get("dtype") if is_converted(folder) else None


def find_converted(weights_root: Path, name: str, dtype: str, source: Path | None = None) -> Path | None:
    """A converted folder of `name`: in `dtype` if there is one, else float32 (casts to any dtype without
    loss), else any dtype — loading casts, so one conversion serves every runtime dtype. With `source`,
    only folders converted from that checkpoint count."""
    preferred = list(dict.fromkeys([dtype, "float32", *DTYPES]))
    for candidate in preferred:
        folder = weights_root / f"{name}-{candidate}"
        if is_converted(folder) and (source is None or _manifest(folder).get("source") == str(source)):
            return folder
    return None


def is_repo_id(model: str) -> bool:
    """`owner/name` names a Hub repo; anything starting with '.', '/' or '~', or without a '/', is a path."""
    return "/" in model and not model.startswith((".", "/", "~"))


def _not_a_model(model: str) -> WeightsError:
    return WeightsError(f"{model}: no such folder, and not a Hub repo id like {DEFAULT_MODEL!r}")


def checkpoint_folder(model: str, offline: bool | None = None) -> Path:
    """A diffusers checkpoint given as a local folder, or as a Hub repo id (downloaded, or found in the cache)."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if not is_repo_id(model):
        raise _not_a_model(model)
    return download(model, offline)


def download(repo_id: str, offline: bool | None = None) -> Path:
    """Fetch (or find in the Hugging Face cache) the files of a diffusers repo; returns the snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id, allow_patterns=_ALLOW, ignore_patterns=_IGNORE, local_files_only=bool(offline)
        )
    except HFValidationError:
        raise _not_a_model(repr(repo_id)) from None
    except (LocalEntryNotFoundError, OSError, HfHubHTTPError) as exc:
        raise SDXSError(
            f"model {repo_id!r} is not in the Hugging Face cache and the Hub cannot be reached ({type(exc).__name__}). "
            f"Provide it as a local diffusers checkpoint folder or a converted weights folder (--model PATH), "
            f"run `mlx-sdxs download {repo_id}` where there is internet and copy the cache "
            f"(~/.cache/huggingface/hub) here, or use `--model random` (random weights, not a trained model)."
        ) from None
    return Path(folder)


def resolve(model: str, dtype: str = "float32", vae: str | None = None, weights_root: Path | None = None,
            offline: bool | None = None) -> Path:
    """Return a converted MLX weights folder for `model`, converting (and downloading) once if needed.

    An existing conversion in another dtype is reused (loading casts): a model is converted once per
    machine, in the dtype the runtime uses there (`dtype`)."""
    weights_root = weights_root or default_weights_root()
    path = Path(model).expanduser()
    if path.exists():
        if is_converted(path) and vae is None:
            return path
        if not is_diffusers_checkpoint(path):
            raise WeightsError(
                f"{path}: neither a converted mlx-sdxs folder (no {C.MANIFEST}) nor a diffusers checkpoint "
                "(no model_index.json)"
            )
        source, name = path, model_slug(path) + _vae_suffix(vae)
        existing = find_converted(weights_root, name, dtype, source)
    elif is_repo_id(model):
        name = _slug(model) + _vae_suffix(vae)
        existing = find_converted(weights_root, name, dtype)
        source = None if existing else download(model, offline)
    else:
        raise _not_a_model(f"--model {model!r}")
    if existing is not None:
        return existing
    target = weights_root / f"{name}-{dtype}"
    vae_folder = None if vae is None else _vae_folder(vae, offline)
    print(f"mlx-sdxs: converting {source} → {target} ({dtype}) once …", flush=True)
    return C.convert_checkpoint(source, target, dtype=dtype, vae=vae_folder)


def _vae_folder(vae: str, offline: bool | None) -> Path:
    """A VAE given as a local folder or a Hub repo (TAESD's repo keeps the VAE at its root)."""
    source = checkpoint_folder(vae, offline)
    return source / "vae" if (source / "vae").is_dir() else source


def _vae_suffix(vae: str | None) -> str:
    return "" if vae is None else "+" + _slug(Path(vae).name if Path(vae).exists() else vae)


def _manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / C.MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def cached_models(weights_root: Path | None = None) -> list[tuple[str, str, int]]:
    """(folder name, stored dtype, size in bytes) of every converted model under the weights root."""
    weights_root = weights_root or default_weights_root()
    if not weights_root.is_dir():
        return []
    found = []
    for folder in sorted(weights_root.iterdir()):
        if is_converted(folder):
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            found.append((folder.name, converted_dtype(folder) or "?", size))
    return found

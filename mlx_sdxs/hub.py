"""Where a model comes from: a Hub repo id, a name of the SDXS-512 family, a local diffusers checkpoint, or a
converted `weights/` folder.

Hub repos are fetched with huggingface-hub (its cache, its progress bars; only configs, tokenizer
files and `.safetensors` weights), converted once into `weights/<repo>-<dtype>/`, and reused. A family
model that is a base plus a ControlNet is converted as one folder; a LoRA stays its own download and is
merged when the model loads (`mlx_sdxs.lora`), so a converted folder is always the base model.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from mlx_sdxs import convert as C
from mlx_sdxs import presets
from mlx_sdxs.runtime import DTYPES
from mlx_sdxs.errors import ModelUnavailable, RandomWeightsWarning, WeightsError

DEFAULT_MODEL = "IDKiro/sdxs-512-0.9"


@dataclass(frozen=True)
class FamilyModel:
    """A `--model` name of the SDXS-512 family: the diffusers repo it builds on, and what it adds."""

    base: str
    controlnet: str | None = None
    lora: str | None = None
    what: str = ""


#: IDKiro/sdxs (arXiv 2403.16627): the four 512 models. Their Hub repo ids work as names too.
FAMILY = {
    "sdxs-512-0.9": FamilyModel(DEFAULT_MODEL, what="text-to-image, CLIP-H (the default)"),
    "sdxs-512-dreamshaper": FamilyModel("IDKiro/sdxs-512-dreamshaper", what="text-to-image, CLIP-L, DreamShaper style"),
    "sdxs-512-dreamshaper-anime": FamilyModel("IDKiro/sdxs-512-dreamshaper", lora="IDKiro/sdxs-512-dreamshaper-anime",
                                              what="DreamShaper + its anime LoRA (PEFT)"),
    "sdxs-512-dreamshaper-sketch": FamilyModel("IDKiro/sdxs-512-dreamshaper",
                                               controlnet="IDKiro/sdxs-512-dreamshaper-sketch",
                                               what="DreamShaper + its sketch ControlNet: sketches and edges to images"),
}
KNOWN_MODELS = (*FAMILY, "stabilityai/sd-turbo")
#: `--vae large`: the checkpoint's own full-size KL VAE, in its `vae_large/` folder (SDXS ships TAESD as `vae/`).
LARGE_VAE = "large"


def family_name(model: str | None) -> str | None:
    """The `FAMILY` name `model` gives (the short name, or its IDKiro/ repo id, such as the Sketch ControlNet's)."""
    name = None if model is None else model.removeprefix("IDKiro/")
    return name if name in FAMILY else None


def family_model(model: str | None) -> FamilyModel | None:
    """The family model `model` names (see `family_name`), or None."""
    name = family_name(model)
    return None if name is None else FAMILY[name]


def known_preset(model: str) -> str | None:
    """The shipped preset in `model`'s shape, for a known model (`KNOWN_MODELS`, a family name or repo id); a model
    that only adds a LoRA has its base's shape. None for any other model."""
    family = family_model(model)
    if family is not None:
        return family_name(family.base if family.lora else model)
    return model.rsplit("/", 1)[-1] if model in KNOWN_MODELS else None


def random_stand_in(model: str | None, error: ModelUnavailable) -> str:
    """The offline rule, one for every command and the API: a known model (`known_preset`; None is the default
    model) that can be neither reached nor found in the cache (`error`) runs as random weights in its own shape —
    the `presets.RANDOM_MODELS` name returned here, without a family model's LoRA — with a `RandomWeightsWarning`
    (a printed line in the CLI) and the random-weights label on every output. Anything else (an unknown repo id, a
    missing local path) stays an error: `error` is raised."""
    model = model or DEFAULT_MODEL
    preset = known_preset(model)
    if preset is None:
        raise error
    stand_in = presets.random_model(preset)
    warnings.warn(RandomWeightsWarning(
        f"model {model!r} cannot be reached or found in the Hugging Face cache: running {stand_in!r} instead, "
        f"random weights in its shape — NOT a trained model (every output says {presets.RANDOM_LABEL!r})"),
        stacklevel=3)
    return stand_in

# Only what mlx-sdxs reads: configs, tokenizer files and full-precision safetensors (no .bin, no
# fp16 variants, no safety checker / feature extractor).
_ALLOW = [
    "model_index.json", "config.json", "*/config.json", "tokenizer/*", "scheduler/*",
    "*/diffusion_pytorch_model.safetensors", "*/model.safetensors", "*/*.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
]
_IGNORE = ["safety_checker/*", "feature_extractor/*", "*.fp16.safetensors", "*.bin", "*.ckpt", "*.onnx*"]
_LORA_ALLOW = ["adapter_config.json", "*.safetensors"]


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


def _not_a_model(model: str, what: str = "model") -> WeightsError:
    return WeightsError(f"{what} {model!r}: no such folder, and not a Hub repo id like {DEFAULT_MODEL!r}")


def checkpoint_folder(model: str, offline: bool | None = None, what: str = "model") -> Path:
    """A diffusers checkpoint given as a local folder, or as a Hub repo id (downloaded, or found in the cache)."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if not is_repo_id(model):
        raise _not_a_model(model, what)
    return download(model, offline)


def download(repo_id: str, offline: bool | None = None, allow: list[str] = _ALLOW) -> Path:
    """Fetch (or find in the Hugging Face cache) the files of a diffusers repo; returns the snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, allow_patterns=allow, ignore_patterns=_IGNORE, local_files_only=bool(offline))
    except HFValidationError:
        raise _not_a_model(repo_id, "repo") from None
    except (LocalEntryNotFoundError, OSError, HfHubHTTPError) as exc:
        raise ModelUnavailable(
            f"{repo_id!r} is not in the Hugging Face cache and the Hub cannot be reached ({type(exc).__name__}). "
            "Give the model as a local diffusers checkpoint folder or a converted weights folder, fetch it where "
            f"there is internet (`mlx-sdxs download {repo_id}`) and copy the cache (~/.cache/huggingface/hub) here, "
            "or use the model 'random' (random weights, not a trained model)."
        ) from None
    return Path(folder)


def lora_path(source: str, offline: bool | None = None) -> Path:
    """A LoRA given as a file or folder, or as a Hub repo (a PEFT adapter, or one .safetensors file in it)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if not is_repo_id(source):
        raise WeightsError(f"LoRA {source!r}: no such file or folder, and not a Hub repo id")
    folder = download(source, offline, _LORA_ALLOW)
    if (folder / "adapter_config.json").is_file():
        return folder
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise WeightsError(f"LoRA {source!r}: expected a PEFT adapter or one .safetensors file in the repo, "
                           f"found {[f.name for f in files]}")
    return files[0]


def resolve(model: str, dtype: str = "float32", vae: str | None = None, weights_root: Path | None = None,
            offline: bool | None = None) -> Path:
    """Return a converted MLX weights folder for `model`, converting (and downloading) once if needed.

    An existing conversion in another dtype is reused (loading casts): a model is converted once per
    machine, in the dtype the runtime uses there (`dtype`). A family model with a ControlNet is converted
    with it; one with a LoRA resolves to its base (see `family_model`)."""
    weights_root = weights_root or default_weights_root()
    family = family_model(model)
    if family is not None:
        return _resolve_family(family, dtype, vae, weights_root, offline)
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
        raise _not_a_model(model)
    if existing is not None:
        return existing
    return _convert(source, weights_root / f"{name}-{dtype}", dtype, vae, offline)


def _resolve_family(family: FamilyModel, dtype: str, vae: str | None, weights_root: Path,
                    offline: bool | None) -> Path:
    """The base repo (and its ControlNet) converted as one folder, named after both."""
    name = _slug(family.base) + (f"+{_slug(family.controlnet)}" if family.controlnet else "") + _vae_suffix(vae)
    existing = find_converted(weights_root, name, dtype)
    if existing is not None:
        return existing
    source = download(family.base, offline)
    controlnet = download(family.controlnet, offline) if family.controlnet else None
    return _convert(source, weights_root / f"{name}-{dtype}", dtype, vae, offline, controlnet)


def _convert(source: Path, target: Path, dtype: str, vae: str | None, offline: bool | None,
             controlnet: Path | None = None) -> Path:
    vae_folder = None if vae is None else _vae_folder(vae, source, offline)
    print(f"mlx-sdxs: converting {source} → {target} ({dtype}) once …", flush=True)
    return C.convert_checkpoint(source, target, dtype=dtype, vae=vae_folder, controlnet=controlnet)


def _vae_folder(vae: str, checkpoint: Path, offline: bool | None) -> Path:
    """`large` (the checkpoint's own `vae_large/`), or a VAE given as a local folder or a Hub repo (TAESD's
    repo keeps the VAE at its root)."""
    if vae == LARGE_VAE:
        if not (checkpoint / "vae_large").is_dir():
            raise WeightsError(f"{checkpoint}: vae {LARGE_VAE!r} needs the checkpoint's vae_large/ folder, which it has not "
                               "(SDXS-512-DreamShaper and SDXS-512-0.9 ship one)")
        return checkpoint / "vae_large"
    source = checkpoint_folder(vae, offline, "vae")
    return source / "vae" if (source / "vae").is_dir() else source


def _vae_suffix(vae: str | None) -> str:
    if vae is None:
        return ""
    return "+vae-large" if vae == LARGE_VAE else "+" + _slug(Path(vae).name if Path(vae).exists() else vae)


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

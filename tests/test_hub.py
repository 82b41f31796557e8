"""Hub loading against a local fake Hugging Face cache (no network), and the offline message."""

from __future__ import annotations

import shutil

import pytest

from checkpoints import build_checkpoint
from mlx_sdxs import hub
from mlx_sdxs.errors import SDXSError, WeightsError
from mlx_sdxs.pipeline import SDXSPipeline

REPO = "IDKiro/sdxs-512-0.9"


@pytest.fixture
def fake_hub_cache(tmp_path, monkeypatch):
    """A cache laid out as huggingface-hub lays it out: models--org--name/{refs/main, snapshots/<rev>/…}."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def put_in_cache(cache, repo: str, source) -> None:
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, repo_dir / "snapshots" / revision)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("hub") / "diffusers")


def test_hub_model_is_converted_once_from_the_cache(fake_hub_cache, tiny_checkpoint, tmp_path, capsys):
    put_in_cache(fake_hub_cache, REPO, tiny_checkpoint)
    weights = tmp_path / "weights"
    pipe = SDXSPipeline.from_pretrained(REPO, weights_root=weights, offline=True)
    assert pipe.name == REPO and pipe.label is None
    converted = weights / "IDKiro--sdxs-512-0.9-float32"
    assert hub.is_converted(converted)
    assert "converting" in capsys.readouterr().out
    # Second time: reuses the converted folder, no conversion message.
    SDXSPipeline.from_pretrained(REPO, weights_root=weights, offline=True)
    assert "converting" not in capsys.readouterr().out
    assert hub.cached_models(weights)[0][0] == converted.name


def test_offline_with_nothing_cached_says_what_to_do(fake_hub_cache, tmp_path):
    with pytest.raises(SDXSError) as info:
        SDXSPipeline.from_pretrained(REPO, weights_root=tmp_path / "weights", offline=True)
    message = str(info.value)
    assert REPO in message and "--model PATH" in message and "random" in message


def test_local_diffusers_folder_and_converted_folder(tiny_checkpoint, tmp_path):
    weights = tmp_path / "weights"
    converted = hub.resolve(str(tiny_checkpoint), weights_root=weights)
    assert converted == weights / "diffusers-float32"
    assert hub.resolve(str(converted), weights_root=weights) == converted


def test_vae_swap_uses_the_other_vae(tiny_checkpoint, tmp_path):
    from checkpoints import tiny_vae

    kl_vae = tmp_path / "kl-vae"
    tiny_vae(seed=7, kind="kl").save_pretrained(kl_vae, safe_serialization=True)
    converted = hub.resolve(str(tiny_checkpoint), vae=str(kl_vae), weights_root=tmp_path / "weights")
    assert type(SDXSPipeline.from_weights(converted).vae).__name__ == "AutoencoderKL"


def test_not_a_model_folder(tmp_path):
    with pytest.raises(WeightsError, match="neither a converted"):
        hub.resolve(str(tmp_path), weights_root=tmp_path / "weights")

"""Hub loading against a local fake Hugging Face cache (no network), and the offline message."""

from __future__ import annotations

import shutil

import pytest

from checkpoints import build_checkpoint
from mlx_sdxs import hub, runtime
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
    # Converted in the dtype this machine computes in (float16 on a GPU, float32 on the CPU), named after
    # the repo, not the snapshot hash.
    converted = weights / f"IDKiro--sdxs-512-0.9-{runtime.dtype_name(runtime.default_dtype())}"
    assert hub.is_converted(converted)
    assert "converting" in capsys.readouterr().out
    # Second time: reuses the converted folder, no conversion message.
    SDXSPipeline.from_pretrained(REPO, weights_root=weights, offline=True)
    assert "converting" not in capsys.readouterr().out
    assert hub.cached_models(weights)[0][:2] == (converted.name, runtime.dtype_name(runtime.default_dtype()))


def test_a_model_is_converted_once_whatever_dtype_asks_for_it(fake_hub_cache, tiny_checkpoint, tmp_path, capsys):
    """A GPU (float16) runtime finds the float32 conversion made earlier and casts it at load, and the other
    way round: no second conversion."""
    import mlx.core as mx

    put_in_cache(fake_hub_cache, REPO, tiny_checkpoint)
    weights = tmp_path / "weights"
    assert hub.resolve(REPO, "float32", weights_root=weights, offline=True).name.endswith("-float32")
    capsys.readouterr()
    assert hub.resolve(REPO, "float16", weights_root=weights, offline=True).name.endswith("-float32")
    pipe = SDXSPipeline.from_pretrained(REPO, dtype=mx.float16, weights_root=weights, offline=True)
    assert pipe.unet.conv_in.weight.dtype == mx.float16
    assert "converting" not in capsys.readouterr().out
    assert [name for name, _, _ in hub.cached_models(weights)] == ["IDKiro--sdxs-512-0.9-float32"]


def test_convert_and_download_default_to_the_runtime_dtype(tiny_checkpoint, tmp_path):
    from mlx_sdxs.cli import main

    weights = tmp_path / "weights"
    assert main(["convert", str(tiny_checkpoint), "--weights-dir", str(weights)]) == 0
    expected = runtime.dtype_name(runtime.default_dtype())
    assert hub.cached_models(weights)[0][:2] == (f"diffusers-{expected}", expected)


def test_offline_with_nothing_cached_says_what_to_do(fake_hub_cache, tmp_path):
    with pytest.raises(SDXSError) as info:
        SDXSPipeline.from_pretrained(REPO, weights_root=tmp_path / "weights", offline=True)
    message = str(info.value)
    assert REPO in message and "--model PATH" in message and "random" in message


def test_local_diffusers_folder_and_converted_folder(tiny_checkpoint, tmp_path):
    weights = tmp_path / "weights"
    converted = hub.resolve(str(tiny_checkpoint), weights_root=weights)
    assert converted == weights / "diffusers-float32"  # named after the folder (resolve's dtype default)
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


def test_folders_are_named_after_the_model_not_the_snapshot_hash(fake_hub_cache, tiny_checkpoint, tmp_path):
    put_in_cache(fake_hub_cache, REPO, tiny_checkpoint)
    snapshot = hub.checkpoint_folder(REPO, offline=True)
    assert snapshot.parent.name == "snapshots"
    assert hub.model_slug(snapshot) == "IDKiro--sdxs-512-0.9"
    assert hub.model_slug(tmp_path / "my-model") == "my-model"

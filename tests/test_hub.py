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


# --- the SDXS-512 family ---------------------------------------------------------------------------


def _tiny_controlnet(folder):
    """A ControlNet for the tiny checkpoint's UNet, saved as the Sketch repo ships it (config + safetensors)."""
    from diffusers import ControlNetModel

    from checkpoints import TEXT_DIM
    from oracle import randomize_

    model = ControlNetModel(block_out_channels=(32, 64), layers_per_block=1,
                            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                            only_cross_attention=(True, False), use_linear_projection=True, attention_head_dim=(1, 2),
                            cross_attention_dim=TEXT_DIM, norm_num_groups=32,
                            conditioning_embedding_out_channels=(8, 8, 8, 8))
    randomize_(model, seed=5).save_pretrained(folder, safe_serialization=True)
    return folder


def _tiny_peft_adapter(folder, unet_folder):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    torch_unet = UNet2DConditionModel.from_pretrained(unet_folder)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False)
    get_peft_model(torch_unet, config).save_pretrained(folder)
    return folder


def test_the_sketch_model_is_its_base_and_its_controlnet_converted_as_one(fake_hub_cache, tiny_checkpoint, tmp_path):
    put_in_cache(fake_hub_cache, "IDKiro/sdxs-512-dreamshaper", tiny_checkpoint)
    put_in_cache(fake_hub_cache, "IDKiro/sdxs-512-dreamshaper-sketch", _tiny_controlnet(tmp_path / "controlnet"))
    weights = tmp_path / "weights"
    pipeline = SDXSPipeline.from_pretrained("sdxs-512-dreamshaper-sketch", weights_root=weights, offline=True)
    assert pipeline.controlnet is not None and pipeline.label is None
    [(name, _, _)] = [entry[:3] for entry in hub.cached_models(weights)]
    assert name.startswith("IDKiro--sdxs-512-dreamshaper+IDKiro--sdxs-512-dreamshaper-sketch-")
    # the plain base is another model: its folder has no ControlNet
    assert SDXSPipeline.from_pretrained("sdxs-512-dreamshaper", weights_root=weights, offline=True).controlnet is None


def test_the_anime_model_is_its_base_with_its_lora_merged_at_load(fake_hub_cache, tiny_checkpoint, tmp_path):
    import numpy as np

    put_in_cache(fake_hub_cache, "IDKiro/sdxs-512-dreamshaper", tiny_checkpoint)
    put_in_cache(fake_hub_cache, "IDKiro/sdxs-512-dreamshaper-anime",
                 _tiny_peft_adapter(tmp_path / "anime", tiny_checkpoint / "unet"))
    weights = tmp_path / "weights"
    anime = SDXSPipeline.from_pretrained("sdxs-512-dreamshaper-anime", weights_root=weights, offline=True)
    base = SDXSPipeline.from_pretrained("sdxs-512-dreamshaper", weights_root=weights, offline=True)
    assert "LoRA IDKiro/sdxs-512-dreamshaper-anime@1" in anime.name
    assert [entry[0] for entry in hub.cached_models(weights)] == ["IDKiro--sdxs-512-dreamshaper-float32"]
    query = lambda p: np.array(p.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight)  # noqa: E731
    assert np.abs(query(anime) - query(base)).max() > 1e-3


def test_vae_large_takes_the_checkpoints_kl_vae(fake_hub_cache, tiny_checkpoint, tmp_path):
    from checkpoints import tiny_vae

    with_large = tmp_path / "dreamshaper"
    shutil.copytree(tiny_checkpoint, with_large)
    tiny_vae(seed=7, kind="kl").save_pretrained(with_large / "vae_large", safe_serialization=True)
    put_in_cache(fake_hub_cache, "IDKiro/sdxs-512-dreamshaper", with_large)
    weights = tmp_path / "weights"
    pipeline = SDXSPipeline.from_pretrained("sdxs-512-dreamshaper", vae="large", weights_root=weights, offline=True)
    assert type(pipeline.vae).__name__ == "AutoencoderKL"
    assert any(entry[0].endswith("+vae-large-float32") for entry in hub.cached_models(weights))
    with pytest.raises(WeightsError, match="vae_large"):
        hub.resolve(str(tiny_checkpoint), vae="large", weights_root=weights)


@pytest.mark.parametrize("model, shape", [("sdxs-512-dreamshaper-sketch", "sdxs-512-dreamshaper-sketch"),
                                          ("sdxs-512-dreamshaper-anime", "sdxs-512-dreamshaper"),
                                          ("IDKiro/sdxs-512-dreamshaper", "sdxs-512-dreamshaper")])
def test_family_models_fall_back_offline_to_labelled_random_weights_of_their_shape(
        fake_hub_cache, tmp_path, monkeypatch, model, shape):
    import io
    from types import SimpleNamespace

    from mlx_sdxs.backends import BackendChoice, load_pipeline

    built = []  # (the full-size random models take a minute to build: their shape is what counts here)
    monkeypatch.setattr(SDXSPipeline, "random", classmethod(
        lambda cls, preset, **kw: built.append(preset) or SimpleNamespace(name=preset, label="RANDOM")))
    log = io.StringIO()
    load_pipeline(BackendChoice(model=model, offline=True, weights_dir=tmp_path), fallback_to_random=True, log=log)
    assert built == [shape]
    assert f"RANDOM WEIGHTS in the {shape} shape: NOT a trained model" in log.getvalue()
    assert model.removeprefix("IDKiro/") in log.getvalue()  # the error says which model could not be had
    assert ("without its LoRA" in log.getvalue()) == model.endswith("anime")
    with pytest.raises(SDXSError):
        load_pipeline(BackendChoice(model="someone/else", offline=True, weights_dir=tmp_path), fallback_to_random=True,
                      log=log)

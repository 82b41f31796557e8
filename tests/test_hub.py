"""Hub loading against a local fake Hugging Face cache (no network), and the offline message."""

from __future__ import annotations

import shutil

import pytest

from checkpoints import build_checkpoint
from mlx_sdxs import hub, presets, runtime
from mlx_sdxs.errors import ConfigError, ModelUnavailable, RandomWeightsWarning, WeightsError
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


def test_offline_an_unknown_model_is_an_error_that_says_what_to_do(fake_hub_cache, tmp_path):
    with pytest.raises(ModelUnavailable) as info:
        SDXSPipeline.from_pretrained("someone/else", weights_root=tmp_path / "weights", offline=True)
    message = str(info.value)
    assert "someone/else" in message and "local diffusers checkpoint folder" in message and "'random'" in message
    assert "--" not in message  # the API's words; the CLI adds its flags (test_hardening)


def test_a_missing_local_path_is_an_error(tmp_path):
    with pytest.raises(WeightsError, match=r"model '\./no-such-folder': no such folder"):
        SDXSPipeline.from_pretrained("./no-such-folder", weights_root=tmp_path)


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


STAND_INS = {None: "random", "sdxs-512-0.9": "random", "sdxs-512-dreamshaper": "random-sdxs-512-dreamshaper",
             "IDKiro/sdxs-512-dreamshaper": "random-sdxs-512-dreamshaper",
             "sdxs-512-dreamshaper-anime": "random-sdxs-512-dreamshaper",  # a LoRA changes no shape; left out
             "sdxs-512-dreamshaper-sketch": "random-sdxs-512-dreamshaper-sketch",
             "stabilityai/sd-turbo": "random-sd-turbo"}


def test_every_known_model_has_a_random_stand_in_of_its_own_shape():
    assert set(hub.KNOWN_MODELS) <= set(STAND_INS)
    error = ModelUnavailable("offline")
    for model, expected in STAND_INS.items():
        with pytest.warns(RandomWeightsWarning, match=expected):
            assert hub.random_stand_in(model, error) == expected
        configs = presets.configs(presets.RANDOM_MODELS[expected])
        family = hub.family_model(model or hub.DEFAULT_MODEL)
        assert ("controlnet" in configs) == bool(family and family.controlnet), model
    for unknown in ("someone/else", "./a/folder", "random-nothing"):
        with pytest.raises(ModelUnavailable):
            hub.random_stand_in(unknown, error)


def test_every_random_model_is_listed_in_the_model_flags_help(capsys):
    from mlx_sdxs.cli import main

    with pytest.raises(SystemExit):
        main(["txt2img", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(f"{name}," in text or f"{name};" in text for name in presets.RANDOM_MODELS), text


@pytest.fixture
def tiny_random(monkeypatch):
    """`SDXSPipeline.random` builds the tiny model of the asked stand-in's kind (the full-size ones take a minute);
    the names it was asked for are recorded."""
    asked, build = [], SDXSPipeline.random.__func__

    def random(cls, model="random", **kwargs):
        asked.append(model)
        controlled = "controlnet" in presets.configs(presets.RANDOM_MODELS.get(model, model))
        return build(cls, "random-tiny-sketch" if controlled else "random-tiny", **kwargs)

    monkeypatch.setattr(SDXSPipeline, "random", classmethod(random))
    return asked


@pytest.mark.parametrize("model", [m for m in STAND_INS if m is not None])
def test_the_api_falls_back_offline_with_a_warning_and_a_flag(fake_hub_cache, tmp_path, tiny_random, model):
    with pytest.warns(RandomWeightsWarning, match="NOT a trained model"):
        pipeline = SDXSPipeline.from_pretrained(model, weights_root=tmp_path, offline=True)
    assert tiny_random == [STAND_INS[model]]
    assert pipeline.random_weights and pipeline.label == presets.RANDOM_LABEL
    assert (pipeline.controlnet is not None) == model.endswith("sketch")


def test_the_cli_falls_back_offline_with_a_printed_line(fake_hub_cache, tmp_path, tiny_random, capfd):
    from mlx_sdxs.cli import main

    out = tmp_path / "out.png"
    # (pytest records warnings; outside it the CLI prints each as a `mlx-sdxs: warning: …` line)
    with pytest.warns(RandomWeightsWarning, match="model 'sdxs-512-dreamshaper-sketch' cannot be reached"):
        assert main(["txt2img", "--prompt", "a fox", "--model", "sdxs-512-dreamshaper-sketch", "--offline", "--size",
                     "64", "--control-image", str(_sketch_png(tmp_path)), "--weights-dir", str(tmp_path),
                     "-o", str(out)]) == 0
    assert f"{presets.RANDOM_LABEL}" in capfd.readouterr().err and out.is_file()
    assert main(["txt2img", "--prompt", "a fox", "--model", "someone/else", "--offline", "--size", "64",
                 "--weights-dir", str(tmp_path), "-o", str(tmp_path / "other.png")]) == 1
    assert "here: --model PATH, or --model random" in capfd.readouterr().err


def _sketch_png(folder):
    import numpy as np

    from mlx_sdxs.imageio import write_image

    drawing = np.full((64, 64, 3), 255, np.uint8)
    drawing[10:50, 30:34] = 0
    write_image(folder / "sketch.png", drawing)
    return folder / "sketch.png"


def test_a_control_image_without_a_controlnet_suggests_models_that_run_offline():
    import numpy as np

    pipeline = SDXSPipeline.random("random-tiny")
    assert pipeline.random_weights  # asked-for random weights say so too
    with pytest.raises(ConfigError) as info:
        pipeline.txt2img("p", size=64, control_image=np.zeros((64, 64, 3), np.uint8))
    message = str(info.value)
    assert "--" not in message and "sdxs-512-dreamshaper-sketch" in message
    suggested = [name for name in presets.RANDOM_MODELS if f"'{name}'" in message]
    assert suggested and all("controlnet" in presets.configs(presets.RANDOM_MODELS[n]) for n in suggested)


def test_library_errors_name_no_command_line_flags():
    """API errors speak API: the text of every exception raised in the library names no `--flag` (the CLI adds its
    flags when it reports an error). Flags are right where the command line is the caller."""
    import ast
    import re
    from pathlib import Path

    package = Path(hub.__file__).parent
    # The commands and their sessions (camera, studio, OSC, bulk jobs, the native build script); lora.py: its owner's.
    command_line = {"cli.py", "options.py", "camera", "studio", "osc.py", "jobs", "_native", "lora.py"}
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if command_line & set(path.relative_to(package).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                texts = [c.value for c in ast.walk(node.exc) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
                if any(re.search(r"(?<![\w-])--[a-z]", text) for text in texts):
                    offenders.append(f"{path.relative_to(package)}:{node.lineno}")
    assert not offenders, f"exception messages naming command-line flags: {offenders}"


def test_the_default_models_preset_is_its_family_name():
    """`presets.DEFAULT` (the bench's shape, the default model's random stand-in) is the default model's."""
    assert hub.family_name(hub.DEFAULT_MODEL) == presets.DEFAULT

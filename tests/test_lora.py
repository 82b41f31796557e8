"""LoRA merged at load vs the libraries that define the layouts, on a tiny SDXS-shaped checkpoint:

- PEFT (`adapter_config.json` + `adapter_model.safetensors`, as IDKiro/sdxs-512-dreamshaper-anime ships):
  peft's `get_peft_model` with random factors (`init_lora_weights=False`), then `merge_and_unload`;
- kohya / A1111 (`lora_unet_…`, `lora_te_…`, `.alpha`): diffusers' `load_lora_weights` + `fuse_lora`.

Both touch linear and 3×3/1×1 conv layers of the UNet and the text encoder. fp32 parity 1e-4 relative, as
every model test; the MLX models run under the suite's kernel policy. Each parity test also drops one
layer's factors and checks that the comparison then fails, so it can.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel

from checkpoints import build_converted
from mlx_sdxs import lora
from mlx_sdxs.errors import ConfigError, WeightsError
from mlx_sdxs.lora import LoraSpec
from mlx_sdxs.pipeline import SDXSPipeline
from oracle import assert_parity, expected_ops, mlx_to_nchw, ops_name

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "time_emb_proj", "conv_shortcut")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
RANK = 4
KOHYA_SCALE = 0.7


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(diffusers checkpoint, its MLX conversion)."""
    return build_converted(tmp_path_factory.mktemp("lora-base"))


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(3)
    return {"sample": torch.randn(1, 4, 8, 8, generator=generator),
            "context": torch.randn(1, 77, 32, generator=generator),
            "ids": torch.randint(0, 500, (1, 77), generator=generator)}


def _torch_outputs(unet, text_encoder, inputs) -> dict[str, np.ndarray]:
    with torch.no_grad():
        eps = unet(inputs["sample"], 999, inputs["context"]).sample
        hidden = text_encoder(inputs["ids"]).last_hidden_state
    return {"eps": eps.numpy(), "hidden": hidden.numpy()}


def _mlx_outputs(pipeline: SDXSPipeline, inputs) -> dict[str, np.ndarray]:
    sample = mx.array(inputs["sample"].numpy().transpose(0, 2, 3, 1))
    eps = pipeline.unet(sample, 999, mx.array(inputs["context"].numpy()))
    hidden = pipeline.text_encoder(mx.array(inputs["ids"].numpy().astype(np.int32)))
    return {"eps": mlx_to_nchw(eps), "hidden": np.array(hidden)}


def _assert_matches(pipeline: SDXSPipeline, expected: dict[str, np.ndarray], inputs) -> None:
    assert ops_name(pipeline.unet) == expected_ops()
    actual = _mlx_outputs(pipeline, inputs)
    assert_parity(actual["eps"], expected["eps"], what="UNet ε with the LoRA")
    assert_parity(actual["hidden"], expected["hidden"], what="text encoder output with the LoRA")


def _assert_dropping_a_layer_fails(mlx_folder: Path, loras: list[Path], expected, inputs, scale: float = 1.0) -> None:
    """The same merge without one UNet layer's, or one text encoder layer's, factors must miss the reference:
    the parity check can fail."""
    for component, what in (("unet", "UNet ε"), ("text_encoder", "text encoder output")):
        pipeline = SDXSPipeline.from_weights(mlx_folder)
        dropped = False
        for path in loras:
            factors = lora.read(path)
            keys = sorted(key for key in factors if key[0] == component)
            if keys and not dropped:
                factors.pop(keys[0])
                dropped = True
            lora.merge({"unet": pipeline.unet, "text_encoder": pipeline.text_encoder}, factors, scale, str(path))
        with pytest.raises(AssertionError, match=what):
            _assert_matches(pipeline, expected, inputs)


# --- PEFT --------------------------------------------------------------------------------------


def _peft_adapter(model: torch.nn.Module, targets, folder: Path, seed: int, **options) -> torch.nn.Module:
    """Random LoRA factors on `model`'s `targets`, saved as a PEFT adapter in `folder`; returns the merged model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, **options)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(folder)
    return peft_model.merge_and_unload()


@pytest.fixture(scope="module")
def peft_case(base, inputs, tmp_path_factory):
    """Adapters for the UNet (with per-module rank and alpha) and for the text encoder, and diffusers' outputs of
    the merged models."""
    checkpoint, _ = base
    root = tmp_path_factory.mktemp("peft")
    unet = _peft_adapter(UNet2DConditionModel.from_pretrained(checkpoint / "unet"), UNET_TARGETS, root / "unet", 0,
                         rank_pattern={"to_q": 2}, alpha_pattern={"proj_out": 2})
    text_encoder = _peft_adapter(CLIPTextModel.from_pretrained(checkpoint / "text_encoder"), TEXT_TARGETS,
                                 root / "text_encoder", 1, use_rslora=True)
    return [root / "unet", root / "text_encoder"], _torch_outputs(unet, text_encoder, inputs)


def test_peft_adapters_match_peft_merge_and_unload(base, inputs, peft_case):
    _, mlx_folder = base
    adapters, expected = peft_case
    pipeline = SDXSPipeline.from_weights(mlx_folder, loras=[(a, LoraSpec(str(a))) for a in adapters])
    _assert_matches(pipeline, expected, inputs)
    _assert_dropping_a_layer_fails(mlx_folder, adapters, expected, inputs)


# --- kohya / A1111 -----------------------------------------------------------------------------


def _kohya_factors(model: torch.nn.Module, prefix: str, targets, generator) -> dict[str, torch.Tensor]:
    """lora_down/lora_up/alpha for every target layer, scaled so the merged model stays O(1)."""
    tensors = {}
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or not name.endswith(targets):
            continue
        key = prefix + name.replace(".", "_")
        if isinstance(module, torch.nn.Conv2d):
            down_shape, up_shape = (RANK, module.in_channels, *module.kernel_size), (module.out_channels, RANK, 1, 1)
        else:
            down_shape, up_shape = (RANK, module.in_features), (module.out_features, RANK)
        down = torch.randn(down_shape, generator=generator)
        tensors[f"{key}.lora_down.weight"] = down / down[0].numel() ** 0.5
        tensors[f"{key}.lora_up.weight"] = torch.randn(up_shape, generator=generator) / RANK ** 0.5
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    return tensors


@pytest.fixture(scope="module")
def kohya_case(base, inputs, tmp_path_factory):
    """A kohya LoRA file for the UNet and text encoder, and diffusers' outputs after `fuse_lora(KOHYA_SCALE)`."""
    checkpoint, _ = base
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    text_encoder = CLIPTextModel.from_pretrained(checkpoint / "text_encoder")
    generator = torch.Generator().manual_seed(4)
    tensors = {**_kohya_factors(unet, "lora_unet_", UNET_TARGETS, generator),
               **_kohya_factors(text_encoder, "lora_te_text_model_", TEXT_TARGETS, generator)}
    file = tmp_path_factory.mktemp("kohya") / "style.safetensors"
    save_file(tensors, file)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=None, unet=unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(copy.deepcopy(tensors))
    pipe.fuse_lora(lora_scale=KOHYA_SCALE)
    pipe.unload_lora_weights()
    return file, _torch_outputs(pipe.unet, pipe.text_encoder, inputs)


def test_kohya_file_matches_diffusers_fuse_lora(base, inputs, kohya_case):
    _, mlx_folder = base
    file, expected = kohya_case
    pipeline = SDXSPipeline.from_weights(mlx_folder, loras=[(file, LoraSpec(str(file), KOHYA_SCALE))])
    assert f"LoRA {file}@0.7" in pipeline.name
    _assert_matches(pipeline, expected, inputs)
    _assert_dropping_a_layer_fails(mlx_folder, [file], expected, inputs, KOHYA_SCALE)


def test_from_pretrained_takes_lora_strings_and_leaves_the_converted_folder_alone(base, inputs, kohya_case):
    _, mlx_folder = base
    file, expected = kohya_case

    def digest() -> str:
        files = sorted(p for p in mlx_folder.rglob("*") if p.is_file())
        return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()

    before = digest()
    pipeline = SDXSPipeline.from_pretrained(str(mlx_folder), loras=[f"{file}:{KOHYA_SCALE}"])
    _assert_matches(pipeline, expected, inputs)
    assert digest() == before
    assert not any("lora" in p.name.lower() for p in mlx_folder.parent.iterdir() if p != mlx_folder)


# --- errors ------------------------------------------------------------------------------------


def _kohya_file(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    file = folder / "bad.safetensors"
    save_file(tensors, file)
    return file


def _unchanged_after(pipeline: SDXSPipeline, file: Path, match: str) -> None:
    """The merge is refused with an error matching `match`, and no weight moved."""
    before = [np.array(p) for _, p in pipeline.unet.parameters()["conv_in"].items()]
    weights = np.array(pipeline.unet.down_blocks[0].resnets[0].conv1.weight)
    with pytest.raises(WeightsError, match=match):
        pipeline.merge_loras([(file, LoraSpec(str(file)))])
    np.testing.assert_array_equal(np.array(pipeline.unet.down_blocks[0].resnets[0].conv1.weight), weights)
    assert all(np.array_equal(a, np.array(b)) for a, b in zip(before, pipeline.unet.parameters()["conv_in"].values()))


def test_keys_that_name_no_layer_are_an_error_naming_them(base, tmp_path):
    _, mlx_folder = base
    good = {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(RANK, 32, 3, 3),
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.ones(32, RANK, 1, 1)}
    bad = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(RANK, 64),
           "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(64, RANK)}
    pipeline = SDXSPipeline.from_weights(mlx_folder)
    _unchanged_after(pipeline, _kohya_file(tmp_path, {**good, **bad}),
                     r"1 LoRA layer\(s\) name nothing in this model: mid_block_attentions_0_proj_in")


def test_a_lora_for_another_base_is_a_shape_error(base, tmp_path):
    _, mlx_folder = base
    wider = {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.ones(RANK, 320, 3, 3),
             "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.ones(320, RANK, 1, 1)}
    pipeline = SDXSPipeline.from_weights(mlx_folder)
    _unchanged_after(pipeline, _kohya_file(tmp_path, wider), "made for another base model")


@pytest.mark.parametrize("tensors, match", [
    ({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, "has no lora_unet_x.lora_up.weight"),
    ({"lora_vae_x.lora_down.weight": torch.zeros(2, 4), "lora_vae_x.lora_up.weight": torch.zeros(4, 2)},
     "names neither the UNet"),
    ({"model.diffusion_model.weight": torch.zeros(2)}, "not a LoRA factor"),
    ({"lora_unet_x.lora_up.weight": torch.zeros(4, 2)}, "has no lora_unet_x.lora_down.weight"),
    ({"lora_unet_x.alpha": torch.tensor(1.0)}, "has no lora_unet_x.lora_down.weight"),
    ({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 3)},
     "ranks differ"),
    ({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2),
      "lora_unet_x.alpha": torch.ones(2)}, "not one number"),
])
def test_malformed_kohya_files_are_refused(tmp_path, tensors, match):
    with pytest.raises(WeightsError, match=match):
        lora.read(_kohya_file(tmp_path, tensors))


def test_what_is_not_a_lora_is_refused(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(WeightsError, match="needs adapter_config.json"):
        lora.read(tmp_path / "folder")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(WeightsError, match="not a LoRA"):
        lora.read(tmp_path / "notes.txt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(WeightsError, match="unreadable safetensors"):
        lora.read(tmp_path / "broken.safetensors")


def _peft_folder(folder: Path, config, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    folder.mkdir()
    (folder / lora.PEFT_CONFIG).write_text(config if isinstance(config, str) else json.dumps(config))
    module = "base_model.model.down_blocks.0.resnets.0.conv1"
    save_file(tensors if tensors is not None else {f"{module}.lora_A.weight": torch.zeros(RANK, 32, 3, 3),
                                                   f"{module}.lora_B.weight": torch.zeros(32, RANK, 1, 1)},
              folder / lora.PEFT_WEIGHTS)
    return folder


@pytest.mark.parametrize("config, tensors, error, match", [
    ("{not json", None, ConfigError, "not valid JSON"),
    ("[]", None, ConfigError, "not a PEFT adapter config"),
    ({"peft_type": "LOHA", "r": RANK}, None, ConfigError, "peft_type 'LOHA' is not LORA"),
    ({"r": RANK, "use_dora": True}, None, ConfigError, "use_dora adapters are not supported"),
    ({"r": 0, "lora_alpha": 8}, None, ConfigError, "r is 0"),
    ({"r": RANK, "lora_alpha": "x"}, None, ConfigError, "lora_alpha is 'x'"),
    ({"r": 2, "lora_alpha": 8}, None, WeightsError, "has rank 4, but the config says r = 2"),
    ({"r": RANK}, {"base_model.model.x.lora_B.weight": torch.zeros(4, RANK)}, WeightsError, "has no"),
    ({"r": RANK}, {}, WeightsError, "holds no LoRA layer"),
])
def test_malformed_peft_adapters_are_refused(tmp_path, config, tensors, error, match):
    with pytest.raises(error, match=match):
        lora.read(_peft_folder(tmp_path / "adapter", config, tensors))


def test_a_scale_that_is_not_finite_is_refused():
    with pytest.raises(ConfigError, match="not a finite number"):
        LoraSpec.parse("style.safetensors:nan")


@pytest.mark.parametrize("text, spec", [
    ("style.safetensors", LoraSpec("style.safetensors")),
    ("style.safetensors:0.6", LoraSpec("style.safetensors", 0.6)),
    ("IDKiro/sdxs-512-dreamshaper-anime:-1", LoraSpec("IDKiro/sdxs-512-dreamshaper-anime", -1.0)),
    ("C:\\loras\\style.safetensors", LoraSpec("C:\\loras\\style.safetensors")),
    ("C:\\loras\\style.safetensors:0.5", LoraSpec("C:\\loras\\style.safetensors", 0.5)),
])
def test_lora_spec_parse(text, spec):
    assert LoraSpec.parse(text) == spec

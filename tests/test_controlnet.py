"""MLX ControlNet vs diffusers `ControlNetModel`, and the UNet taking its residuals vs diffusers' UNet: seeded
random weights, the same inputs, fp32 parity 1e-4 (max-abs error / max|ref|). Small configs cover the
options (mid block in the UNet or not, BGR channel order, a conditioning scale); the SDXS-512-DreamShaper
Sketch shape (186.6 M parameters) runs at full size (slow). float16 under `portable` at 1e-2, as the UNet.
"""

from __future__ import annotations

import gc
import inspect
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet

import mlx_sdxs
from mlx_sdxs.errors import ConfigError
from mlx_sdxs.models.controlnet import ControlNetConfig
from mlx_sdxs.weights import load_controlnet
from oracle import assert_parity, cached, expected_ops, mlx_to_nchw, ops_name, randomize_, save_and_convert

SMALL = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=4,
    layers_per_block=1,
    conditioning_embedding_out_channels=(8, 16, 16, 32),
)
UP = {"DownBlock2D": "UpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D"}
CASES = {
    "sd-layout": {},
    "dreamshaper-layout-bgr": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), layers_per_block=2,
                                   controlnet_conditioning_channel_order="bgr"),
}
SCALE = 0.8
FP16_RTOL = 1e-2


def _unet_config(controlnet: dict, mid: bool) -> dict:
    """The UNet the ControlNet was made for: same down path; with a mid block or (SDXS) without."""
    keys = inspect.signature(TorchUNet.__init__).parameters
    config = {k: v for k, v in controlnet.items() if k in keys}
    config["up_block_types"] = [UP[t] for t in reversed(controlnet["down_block_types"])]
    config["mid_block_type"] = "UNetMidBlock2DCrossAttn" if mid else None
    return config


def _reference(config: dict, size: int, mid: bool, dtype: str = "float32") -> Path:
    """diffusers' ControlNet residuals and the UNet's ε with them, on seeded weights (cached, see `oracle`)."""

    def build(folder: Path) -> None:
        controlnet = randomize_(TorchControlNet(**config), seed=0)
        unet = randomize_(TorchUNet(**_unet_config(config, mid)), seed=1)
        generator = torch.Generator().manual_seed(2)
        sample = torch.randn(1, 4, size, size, generator=generator)
        context = torch.randn(1, 77, config["cross_attention_dim"], generator=generator)
        image = torch.rand(1, 3, 8 * size, 8 * size, generator=generator)
        with torch.no_grad():
            down, mid_residual = controlnet(sample, 999, context, image, conditioning_scale=SCALE, return_dict=False)
            eps = unet(sample, 999, context, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid_residual).sample
        np.savez(folder / "io.npz", sample=sample.numpy(), context=context.numpy(), image=image.numpy(),
                 mid=mid_residual.numpy(), eps=eps.numpy(), **{f"down{i}": d.numpy() for i, d in enumerate(down)})
        save_and_convert(controlnet, folder, "controlnet", dtype, keep_source=False)
        save_and_convert(unet, folder, "unet", dtype, keep_source=False)
        del controlnet, unet
        gc.collect()

    return cached({"controlnet": config, "size": size, "mid": mid, "dtype": dtype}, build)


def _check(config: dict, size: int = 8, mid: bool = True, run_dtype: str = "float32", kernels: str | None = None,
           rtol: float = 1e-4) -> float:
    folder = _reference(config, size, mid)
    io = np.load(folder / "io.npz")
    dtype = getattr(mx, run_dtype)
    controlnet = load_controlnet(folder / "controlnet-mlx", dtype, kernels)
    unet = mlx_sdxs.load_unet(folder / "unet-mlx", dtype, kernels)
    assert ops_name(controlnet) == (kernels or expected_ops(dtype))
    sample = mx.array(io["sample"].transpose(0, 2, 3, 1)).astype(dtype)
    context = mx.array(io["context"]).astype(dtype)
    image = mx.array(io["image"].transpose(0, 2, 3, 1))
    down, mid_residual = controlnet(sample, 999, context, image, SCALE)
    errors = [assert_parity(mlx_to_nchw(d), io[f"down{i}"], rtol, f"down residual {i}") for i, d in enumerate(down)]
    assert len(down) == len([k for k in io.files if k.startswith("down")])
    errors.append(assert_parity(mlx_to_nchw(mid_residual), io["mid"], rtol, "mid residual"))
    eps = unet(sample, 999, context, residuals=(down, mid_residual))
    errors.append(assert_parity(mlx_to_nchw(eps), io["eps"], rtol, "UNet ε with the residuals"))
    return max(errors)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("mid", [True, False], ids=["unet-with-mid", "unet-without-mid"])
def test_small_config_parity(name, mid):
    _check({**SMALL, **CASES[name]}, mid=mid)


@pytest.mark.policy_independent  # the kernels are pinned
def test_portable_float16_matches_the_float32_oracle():
    err = _check({**SMALL, **CASES["dreamshaper-layout-bgr"]}, mid=False, run_dtype="float16", kernels="portable",
                 rtol=FP16_RTOL)
    print(f"portable float16 relative error {err:.2e}")


def test_parameter_names_mirror_diffusers():
    from mlx.utils import tree_flatten

    from mlx_sdxs.weights import build_model, map_key

    config = {**SMALL, **CASES["dreamshaper-layout-bgr"]}
    torch_keys = {map_key("controlnet", k) for k in TorchControlNet(**config).state_dict()}
    model = build_model({"_class_name": "ControlNetModel", **config}, "controlnet")
    assert {k for k, _ in tree_flatten(model.parameters())} == torch_keys


@pytest.mark.parametrize("field, value", [("mid_block_type", None), ("global_pool_conditions", True),
                                          ("controlnet_conditioning_channel_order", "gbr"),
                                          ("conditioning_embedding_out_channels", [8, 0]),
                                          ("conditioning_embedding_out_channels", 8),
                                          ("conditioning_channels", 1),
                                          ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"])])
def test_unsupported_config_raises_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ControlNetConfig.from_dict({**SMALL, field: value})


@pytest.mark.policy_independent  # a dtype rule, not a kernel's result
def test_float16_residuals_stay_float16_under_a_float32_strength_array():
    """The compiled frame passes the strength as a float32 array (so a knob never recompiles): it must not lift
    the float16 residuals, and with them the UNet's whole up path, to float32."""
    pipeline = mlx_sdxs.SDXSPipeline.random("random-tiny-sketch", dtype=mx.float16)
    sample = mx.zeros((1, 8, 8, 4), mx.float16)
    down, mid = pipeline.controlnet(sample, 999, mx.zeros((1, 77, 64), mx.float16), mx.zeros((1, 64, 64, 3)),
                                    mx.array(0.8, dtype=mx.float32))
    assert {d.dtype for d in down} | {mid.dtype} == {mx.float16}


def test_a_controlnet_for_another_unet_is_refused_naming_the_mismatch():
    from mlx_sdxs import presets
    from mlx_sdxs.weights import build_model

    pipeline = mlx_sdxs.SDXSPipeline.random("random-tiny-sketch")
    parts = (pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer, pipeline.scheduler)
    config = presets.configs("tiny-sketch")["controlnet"]
    for change, match in (({"layers_per_block": 2}, r"residuals have .* channels but the unet's skips"),
                          ({"in_channels": 8}, r"takes 8-channel latents"),
                          ({"cross_attention_dim": 32}, r"controlnet attends to \[32\]")):
        other = build_model({**config, **change}, "controlnet")
        with pytest.raises(ConfigError, match=match):
            mlx_sdxs.SDXSPipeline(*parts, controlnet=other)


@pytest.mark.slow
def test_sdxs_512_dreamshaper_sketch_full_size():
    """The Sketch ControlNet's shape on the DreamShaper UNet (no mid block), a 512² control image."""
    from mlx_sdxs import presets

    config = {k: v for k, v in presets.configs("sdxs-512-dreamshaper-sketch")["controlnet"].items()
              if not k.startswith("_")}
    print(f"relative error {_check(config, size=64, mid=False):.2e}")


def test_the_sketch_preset_is_diffusers_controlnet_of_the_dreamshaper_unet():
    from mlx_sdxs import presets

    configs = presets.configs("sdxs-512-dreamshaper-sketch")
    controlnet = {k: v for k, v in configs["controlnet"].items() if not k.startswith("_")}
    with torch.device("meta"):
        model = TorchControlNet(**controlnet)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 186.6
    unet = configs["unet"]
    for key in ("block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim",
                "attention_head_dim"):
        assert json.dumps(controlnet[key]) == json.dumps(unet[key]), key


# --- the camera stream with a ControlNet: MLX vs torch --------------------------------------------


@pytest.fixture(scope="module")
def sketch_checkpoint(tmp_path_factory):
    from checkpoints import build_sketch_checkpoint

    return build_sketch_checkpoint(tmp_path_factory.mktemp("tiny-sketch") / "diffusers")


def test_mlx_stream_with_control_matches_torch(sketch_checkpoint, tmp_path):
    """Edges of each camera frame steer both backends alike (pixel tolerance as every backend comparison), through a
    mode and strength change mid-stream; with strength 0 the output moves by far more than that tolerance."""
    from checkpoints import assert_controlled_streams_match, camera_frames
    from mlx_sdxs import convert_checkpoint
    from mlx_sdxs.backends.torch_backend import TorchEngine
    from mlx_sdxs.pipeline import SDXSPipeline
    from mlx_sdxs.recipe import Recipe, RecipeSettings

    settings = RecipeSettings(render_size=64, feedback=0.1, seed=42, control="edges", control_strength=SCALE)
    pipeline = SDXSPipeline.from_weights(convert_checkpoint(sketch_checkpoint, tmp_path / "mlx"))
    mlx = pipeline.stream(settings, prompt="a pencil drawing of a house")
    reference = Recipe(TorchEngine(sketch_checkpoint), settings, "a pencil drawing of a house")
    frames = camera_frames(5)
    assert_controlled_streams_match(mlx, reference, frames, "MLX vs torch")

    uncontrolled = pipeline.stream(RecipeSettings(render_size=64, seed=42, control_strength=0.0), "a pencil drawing")
    controlled = pipeline.stream(RecipeSettings(render_size=64, seed=42), "a pencil drawing")
    diff = np.abs(controlled.process(frames[0]).astype(int) - uncontrolled.process(frames[0]).astype(int))
    assert diff.mean() > 8, f"the control image barely moves the output (mean |Δ| {diff.mean():.2f}/255)"


def test_the_parity_check_fails_without_a_residual():
    """Dropping one down residual (or the mid one) before the UNet misses diffusers' ε: the check can fail."""
    config = {**SMALL, **CASES["sd-layout"]}
    folder = _reference(config, 8, True)
    io = np.load(folder / "io.npz")
    controlnet = load_controlnet(folder / "controlnet-mlx")
    unet = mlx_sdxs.load_unet(folder / "unet-mlx")
    sample = mx.array(io["sample"].transpose(0, 2, 3, 1))
    context = mx.array(io["context"])
    down, mid_residual = controlnet(sample, 999, context, mx.array(io["image"].transpose(0, 2, 3, 1)), SCALE)
    for i in range(len(down)):
        dropped = [mx.zeros_like(d) if j == i else d for j, d in enumerate(down)]
        with pytest.raises(AssertionError, match="UNet ε"):
            assert_parity(mlx_to_nchw(unet(sample, 999, context, residuals=(dropped, mid_residual))), io["eps"],
                          what="UNet ε")
    with pytest.raises(AssertionError, match="UNet ε"):
        assert_parity(mlx_to_nchw(unet(sample, 999, context, residuals=(down, mx.zeros_like(mid_residual)))),
                      io["eps"], what="UNet ε")

"""MLX UNet vs diffusers `UNet2DConditionModel`: seeded random weights, same inputs, fp32 parity 1e-4.

Small configs cover every supported config option (≈1 s each); the three target checkpoints'
configs run at full width (slow). fp16 weights are checked at 1e-2 relative.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

import mlx_sdxs
from mlx_sdxs.errors import ConfigError
from mlx_sdxs.models.unet import UNetConfig
from oracle import assert_parity, cached, expected_ops, mlx_to_nchw, ops_name, randomize_, save_and_convert

FP16_RTOL = 1e-2

SMALL = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=4,
    layers_per_block=1,
    sample_size=16,
)

# Each case overrides SMALL; together they exercise every option `UNetConfig.from_dict` accepts.
CASES = {
    "crossattn-down-plain-up": {},
    "sd-layout-3-levels": dict(
        block_out_channels=(32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        norm_num_groups=16,
        use_linear_projection=True,
    ),
    "sdxs-layout-no-mid": dict(
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type=None,
        only_cross_attention=[True, False],
        attention_head_dim=[2, 4],
        use_linear_projection=True,
    ),
    "plain-down-crossattn-up": dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type=None,
    ),
    "only-cross-bool-heads-not-dividing": dict(only_cross_attention=True, attention_head_dim=[3, 5]),
    "layers-and-transformer-lists": dict(
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=[1, 2],
        transformer_layers_per_block=[2, 1],
        cross_attention_dim=[32, 32],  # a list; one context means equal entries
    ),
    "transformer-layers-int-upcast": dict(transformer_layers_per_block=2, upcast_attention=True),
    "sin-first-freq-shift-center": dict(
        flip_sin_to_cos=False, freq_shift=1, center_input_sample=True, mid_block_scale_factor=1.5, norm_eps=1e-6
    ),
    "downsample-padding-0-kernels": dict(downsample_padding=0, conv_in_kernel=1, conv_out_kernel=1),
    "time-embedding-dim-channels": dict(time_embedding_dim=96, in_channels=3, out_channels=5),
}


def _inputs(config: dict, batch: int, size: tuple[int, int], seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config.get("in_channels", 4), *size, generator=generator)
    cross_dim = config["cross_attention_dim"]
    context = torch.randn(batch, 77, cross_dim if isinstance(cross_dim, int) else cross_dim[0], generator=generator)
    return sample, context


def _reference(config: dict, size: tuple[int, int], batch: int, timestep, dtype: str) -> Path:
    """diffusers' output on seeded weights and inputs, and those weights converted (cached, see `oracle`)."""

    def build(folder: Path) -> None:
        torch_unet = randomize_(TorchUNet(**config), seed=0)
        sample, context = _inputs(config, batch, size)
        with torch.no_grad():
            torch_timestep = torch.tensor(timestep) if isinstance(timestep, list) else timestep
            expected = torch_unet(sample, torch_timestep, context).sample
        np.savez(folder / "io.npz", sample=sample.numpy(), context=context.numpy(), expected=expected.numpy())
        save_and_convert(torch_unet, folder, "unet", dtype, keep_source=False)
        del torch_unet  # full-size configs: keep torch and MLX weights from coexisting
        gc.collect()

    return cached({"unet": config, "size": size, "batch": batch, "timestep": timestep, "dtype": dtype}, build)


def _check(config: dict, size=(16, 16), batch=1, timestep=999, mlx_timestep=None, dtype="float32", rtol=1e-4,
           run_dtype: str | None = None, kernels: str | None = None) -> float:
    """Run MLX on the weights and inputs diffusers ran (stored as `dtype`, computed in `run_dtype`, with
    `kernels` or the suite's policy); returns the relative error against the float32 oracle.

    `timestep` is a number or a per-sample list; `mlx_timestep` overrides what MLX receives.
    """
    folder = _reference(config, tuple(size), batch, timestep, dtype)
    io = np.load(folder / "io.npz")
    mx_dtype = getattr(mx, run_dtype or dtype)
    mlx_unet = mlx_sdxs.load_unet(folder / "unet-mlx", mx_dtype, kernels)
    assert ops_name(mlx_unet) == (kernels or expected_ops(mx_dtype))
    if mlx_timestep is None:
        mlx_timestep = mx.array(timestep) if isinstance(timestep, list) else timestep
    sample = mx.array(io["sample"].transpose(0, 2, 3, 1)).astype(mx_dtype)
    out = mlx_unet(sample, mlx_timestep, mx.array(io["context"]).astype(mx_dtype))
    assert out.dtype == mx_dtype
    return assert_parity(mlx_to_nchw(out), io["expected"], rtol=rtol)


@pytest.mark.parametrize("name", CASES)
def test_small_config_parity(name):
    _check({**SMALL, **CASES[name]})


def test_batch_with_per_sample_timesteps():
    _check({**SMALL, **CASES["sdxs-layout-no-mid"]}, batch=2, timestep=[999, 250])


@pytest.mark.parametrize(
    "timestep, mlx_timestep",
    [(499.5, None), (0, None), (999, mx.array(999)), ([999, 999], mx.array(999)), ([250, 250], mx.array([250.0]))],
    ids=["fractional-float", "int-zero", "shape-()-array", "shape-()-array-batch-2", "shape-(1,)-array-batch-2"],
)
def test_timestep_forms(timestep, mlx_timestep):
    batch = len(timestep) if isinstance(timestep, list) else 1
    _check(SMALL, batch=batch, timestep=timestep, mlx_timestep=mlx_timestep)


def test_odd_latent_size():
    # 18×14 latent: downsampling gives 9×7, so upsampling must hit the skip size, not 2×.
    _check({**SMALL, **CASES["sd-layout-3-levels"]}, size=(18, 14))


def test_fp16_weights():
    """fp16 weights and activations (group norm statistics in fp32), checked at 1e-2 relative."""
    err = _check({**SMALL, **CASES["sdxs-layout-no-mid"]}, size=(8, 8), dtype="float16", rtol=FP16_RTOL)
    print(f"fp16 relative error {err:.2e}")


# float16 as a GPU runs it: `portable` kernels, float16 compute, against the float32 diffusers oracle.
# Measured max-abs error / max|ref|: 2.3e-3 (SDXS-512-0.9 at 32²) … 3.5e-3 (small configs). float16 keeps
# 11 significant bits (4.9e-4 per rounding) and a UNet compounds dozens of them; 1e-2 leaves ~3× headroom.
PORTABLE_FP16_RTOL = 1e-2


@pytest.mark.policy_independent  # the kernels are pinned
@pytest.mark.parametrize("name", ["sdxs-layout-no-mid", "sd-layout-3-levels", "transformer-layers-int-upcast"])
def test_portable_float16_matches_the_float32_oracle(name):
    err = _check({**SMALL, **CASES[name]}, run_dtype="float16", kernels="portable", rtol=PORTABLE_FP16_RTOL)
    print(f"portable float16 relative error {err:.2e}")


def test_parameter_names_mirror_diffusers():
    from mlx.utils import tree_flatten

    from mlx_sdxs.weights import build_model, map_key

    config = {**SMALL, **CASES["sdxs-layout-no-mid"]}
    torch_keys = {map_key("unet", k) for k in TorchUNet(**config).state_dict()}
    mlx_unet = build_model({"_class_name": "UNet2DConditionModel", **config}, "unet")
    mlx_keys = {k for k, _ in tree_flatten(mlx_unet.parameters())}
    assert mlx_keys == torch_keys
    assert "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight" in mlx_keys


# ---------------------------------------------------------------------------------------------- config


def test_config_resolves_diffusers_quirks():
    config = UNetConfig.from_dict(
        {
            **SMALL,
            "block_out_channels": [32, 64, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": [2, 4, 8],
            "only_cross_attention": [True, False, False],
            "layers_per_block": [1, 2, 3],
            "an_unknown_future_key": 1,
        }
    )
    assert [lvl.num_heads for lvl in config.down_levels] == [2, 4, 8]  # heads, not head size (#2011)
    assert [lvl.num_heads for lvl in config.up_levels] == [8, 4, 2]
    assert [lvl.num_layers for lvl in config.up_levels] == [4, 3, 2]
    assert [lvl.only_cross_attention for lvl in config.up_levels] == [False, False, True]
    assert config.time_embedding_dim == 128


@pytest.mark.parametrize(
    "field, value",
    [
        ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
        ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("attention_head_dim", [4, 4, 4]),
        ("attention_head_dim", "eight"),
        ("only_cross_attention", [True]),
        ("layers_per_block", 0),
        ("norm_num_groups", 7),
        ("transformer_layers_per_block", [[1, 2], [1, 1]]),
        ("downsample_padding", 2),
        ("use_linear_projection", "yes"),
        ("class_embed_type", "timestep"),
        ("num_class_embeds", 10),
        ("addition_embed_type", "text_time"),
        ("encoder_hid_dim", 64),
        ("dual_cross_attention", True),
        ("attention_type", "gated"),
        ("resnet_skip_time_act", True),
        ("resnet_time_scale_shift", "scale_shift"),
        ("time_embedding_type", "fourier"),
        ("time_cond_proj_dim", 256),
        ("act_fn", "gelu"),
        ("num_attention_heads", 8),
    ],
)
def test_unsupported_config_raises_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        UNetConfig.from_dict({**SMALL, field: value})


# ---------------------------------------------------------------------------------------------- full size


def _shared_config(shared_dir, name: str) -> dict:
    config = json.loads((shared_dir / "configs" / name / "unet" / "config.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.mark.slow
def test_sdxs_512_09_full_size(shared_dir):
    """The key test: SDXS-512-0.9 at its native 64×64 latent, t=999 (its one step)."""
    config = _shared_config(shared_dir, "sdxs-512-0.9")
    print(f"relative error {_check(config, size=(64, 64)):.2e}")


@pytest.mark.slow
@pytest.mark.policy_independent  # the kernels are pinned
def test_sdxs_512_09_portable_float16(shared_dir):
    """The GPU's arithmetic on the real shape (a 32×32 latent: float16 matmul is slow on a CPU)."""
    config = _shared_config(shared_dir, "sdxs-512-0.9")
    err = _check(config, size=(32, 32), run_dtype="float16", kernels="portable", rtol=PORTABLE_FP16_RTOL)
    print(f"portable float16 relative error {err:.2e}")


@pytest.mark.slow
def test_sdxs_512_dreamshaper_full_size(shared_dir):
    config = _shared_config(shared_dir, "sdxs-512-dreamshaper")
    print(f"relative error {_check(config, size=(64, 64)):.2e}")


@pytest.mark.slow
def test_sd_turbo_full_size(shared_dir):
    """866M parameters: a 32×32 latent keeps time and memory down (torch is freed before MLX runs)."""
    config = _shared_config(shared_dir, "sd-turbo")
    print(f"relative error {_check(config, size=(32, 32), timestep=499):.2e}")

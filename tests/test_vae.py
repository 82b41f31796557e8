"""MLX TAESD and KL VAEs against diffusers 0.42.1, encode and decode checked separately.

Each test builds the diffusers model from a config, fills it with seeded random weights, saves and
converts it with mlx-sdxs, loads it with `mlx_sdxs.load_vae` and compares outputs on the same seeded
input. Tolerance: fp32 max-abs error ≤ 1e-4 · max|ref|; fp16 weights ≤ 1e-2 · max|ref|.
"""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from oracle import assert_parity, expected_ops, mlx_to_nchw, nchw_to_mlx, ops_name, randomize_, save_and_convert
from safetensors.torch import load_file, save_file

import mlx_sdxs
from mlx_sdxs.convert import convert_component
from mlx_sdxs.errors import ConfigError
from mlx_sdxs.models.autoencoder_kl import KLVAEConfig
from mlx_sdxs.models.taesd import TinyVAEConfig

FP16_RTOL = 1e-2  # measured ~2e-3 on these configs (fp16 weights, and the portable fp16 runs below)

# The diffusers default AutoencoderTiny config, which is what SDXS-512 ships as its vae/config.json.
SDXS_TAESD = {
    "_class_name": "AutoencoderTiny",
    "act_fn": "relu",
    "decoder_block_out_channels": [64, 64, 64, 64],
    "encoder_block_out_channels": [64, 64, 64, 64],
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "num_decoder_blocks": [3, 3, 3, 1],
    "num_encoder_blocks": [1, 3, 3, 3],
    "out_channels": 3,
    "scaling_factor": 1.0,
    "upsampling_scaling_factor": 2,
}

# Fewer, narrower stages, more latent channels and ×3 upsampling: every config field is exercised.
SMALL_TAESD = {
    "_class_name": "AutoencoderTiny",
    "encoder_block_out_channels": [16, 16, 16],
    "decoder_block_out_channels": [24, 24, 24],
    "num_encoder_blocks": [1, 2, 1],
    "num_decoder_blocks": [2, 1, 1],
    "latent_channels": 6,
    "upsampling_scaling_factor": 3,
}

# SD-2.1 / SD-Turbo's KL VAE.
SD21_KL = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}


def small_kl(**overrides) -> dict:
    config = {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "norm_num_groups": 8,
        "layers_per_block": 1,
        "latent_channels": 4,
    }
    return {**config, **overrides}


def torch_vae(config: dict, seed: int = 0) -> torch.nn.Module:
    cls = {"AutoencoderTiny": AutoencoderTiny, "AutoencoderKL": AutoencoderKL}[config["_class_name"]]
    return randomize_(cls.from_config(config), seed)


def seeded(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def image(height: int, width: int, seed: int = 1) -> torch.Tensor:
    """A seeded image in [-1, 1], NCHW."""
    return torch.rand((1, 3, height, width), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def check_encode_decode(reference, mlx_vae, pixels: torch.Tensor, latents: torch.Tensor,
                        rtol: float = 1e-4, dtype: mx.Dtype = mx.float32, kernels: str | None = None) -> None:
    """Encode `pixels` and decode `latents` with both models and compare each result (`mlx_vae` computes in
    `dtype` with `kernels`, the suite's policy by default)."""
    assert ops_name(mlx_vae) == (kernels or expected_ops(dtype))
    with torch.no_grad():
        if isinstance(reference, AutoencoderKL):
            expected_latents = reference.encode(pixels).latent_dist.mean
        else:
            expected_latents = reference.encode(pixels).latents
        expected_pixels = reference.decode(latents).sample
    got_latents = mlx_vae.encode(nchw_to_mlx(pixels).astype(dtype))
    got_pixels = mlx_vae.decode(nchw_to_mlx(latents).astype(dtype))
    assert got_latents.dtype == dtype and got_pixels.dtype == dtype
    assert_parity(mlx_to_nchw(got_latents), expected_latents, rtol, what="encode")
    assert_parity(mlx_to_nchw(got_pixels), expected_pixels, rtol, what="decode")


# ---- TAESD -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxs_taesd(tmp_path_factory):
    reference = torch_vae(SDXS_TAESD)
    folder = save_and_convert(reference, tmp_path_factory.mktemp("taesd"), "vae")
    return reference, mlx_sdxs.load_vae(folder), folder


@pytest.mark.parametrize("height,width", [(64, 96), pytest.param(512, 512, marks=pytest.mark.slow)])
def test_taesd_sdxs_config_matches_diffusers(sdxs_taesd, height, width):
    reference, vae, _ = sdxs_taesd
    # Latents up to ±9 so that the decoder's tanh soft clamp at ±3 is exercised.
    latents = seeded((1, 4, height // 8, width // 8), seed=2, scale=3.0)
    check_encode_decode(reference, vae, image(height, width), latents)
    assert vae.config.scaling_factor == SDXS_TAESD["scaling_factor"]


def test_taesd_small_variant_matches_diffusers(tmp_path):
    reference = torch_vae(SMALL_TAESD, seed=3)
    vae = mlx_sdxs.load_vae(save_and_convert(reference, tmp_path, "vae"))
    check_encode_decode(reference, vae, image(36, 48), seeded((1, 6, 5, 7), seed=4, scale=2.0))


def test_taesd_config_is_the_shipped_sdxs_config(shared_dir):
    shipped = json.loads((shared_dir / "configs/sdxs-512-0.9/vae/config.json").read_text())
    assert TinyVAEConfig.from_dict(shipped) == TinyVAEConfig.from_dict(SDXS_TAESD)
    assert {k: shipped[k] for k in SDXS_TAESD} == SDXS_TAESD


def test_taesd_fp16_weights(tmp_path):
    reference = torch_vae(SMALL_TAESD, seed=5)
    vae = mlx_sdxs.load_vae(save_and_convert(reference, tmp_path, "vae", dtype="float16"))
    assert vae.encoder.layers[0].weight.dtype == mx.float16
    check_encode_decode(reference, vae, image(36, 48), seeded((1, 6, 5, 7), seed=6),
                        rtol=FP16_RTOL, dtype=mx.float16)


# ---- AutoencoderKL -----------------------------------------------------------------------------


def save_with_legacy_attention_names(reference: AutoencoderKL, tmp_path):
    """Save as a pre-0.14 diffusers checkpoint: `query/key/value/proj_attn`, weights as 1×1 convs."""
    src = tmp_path / "vae-legacy"
    reference.save_pretrained(src, safe_serialization=True)
    path = src / "diffusion_pytorch_model.safetensors"
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for key, value in load_file(path).items():
        for new, old in renames.items():
            if new in key:
                key = key.replace(new, old)
                value = value[:, :, None, None] if value.ndim == 2 else value
        legacy[key] = value.contiguous()
    assert any(".query." in key for key in legacy)
    save_file(legacy, path)
    return convert_component(src, tmp_path / "vae-mlx", "vae")


@pytest.mark.parametrize(
    "overrides,legacy",
    [
        ({"layers_per_block": 1}, True),
        ({"layers_per_block": 2, "use_quant_conv": False, "use_post_quant_conv": False}, False),
        ({"layers_per_block": 1, "mid_block_add_attention": False, "latent_channels": 8}, False),
    ],
    ids=["legacy-attention-names", "no-quant-convs", "no-mid-attention"],
)
def test_kl_small_matches_diffusers(tmp_path, overrides, legacy):
    config = small_kl(**overrides)
    reference = torch_vae(config, seed=7)
    folder = save_with_legacy_attention_names(reference, tmp_path) if legacy else save_and_convert(reference, tmp_path, "vae")
    vae = mlx_sdxs.load_vae(folder)
    assert ("quant_conv" in vae) == config.get("use_quant_conv", True)
    latents = seeded((1, config["latent_channels"], 8, 12), seed=8)
    check_encode_decode(reference, vae, image(16, 24), latents)


def test_kl_fp16_weights(tmp_path):
    reference = torch_vae(small_kl(force_upcast=False), seed=9)
    vae = mlx_sdxs.load_vae(save_and_convert(reference, tmp_path, "vae", dtype="float16"))
    check_encode_decode(reference, vae, image(16, 24), seeded((1, 4, 8, 12), seed=10),
                        rtol=FP16_RTOL, dtype=mx.float16)


def test_kl_force_upcast_runs_float32_under_a_float16_runtime(tmp_path):
    """SD's KL VAE overflows in float16; its config's `force_upcast` (the default) keeps it float32."""
    reference = torch_vae(small_kl(), seed=9)
    folder = save_and_convert(reference, tmp_path, "vae")
    vae = mlx_sdxs.load_vae(folder, mx.float16)
    assert vae.decoder.conv_in.weight.dtype == mx.float32
    check_encode_decode(reference, vae, image(16, 24), seeded((1, 4, 8, 12), seed=10))
    assert mlx_sdxs.load_vae(folder, mx.bfloat16).decoder.conv_in.weight.dtype == mx.bfloat16  # range enough


def test_taesd_portable_float16_matches_the_float32_oracle(sdxs_taesd):
    """TAESD as a GPU runs it (portable kernels, float16), against float32 diffusers."""
    reference, _, _ = sdxs_taesd
    vae = mlx_sdxs.load_vae(sdxs_taesd[2], mx.float16, kernels="portable")
    check_encode_decode(reference, vae, image(64, 96), seeded((1, 4, 8, 12), seed=2, scale=3.0),
                        rtol=FP16_RTOL, dtype=mx.float16, kernels="portable")


@pytest.mark.slow
def test_kl_sd21_config_matches_diffusers(tmp_path):
    reference = torch_vae(SD21_KL, seed=11)
    vae = mlx_sdxs.load_vae(save_and_convert(reference, tmp_path, "vae"))
    assert vae.config.scaling_factor == 0.18215 and vae.config.shift_factor is None
    check_encode_decode(reference, vae, image(64, 64), seeded((1, 4, 8, 8), seed=12))


# ---- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config_cls,config,field",
    [
        (TinyVAEConfig, {**SDXS_TAESD, "act_fn": "gelu"}, "act_fn"),
        (TinyVAEConfig, {**SDXS_TAESD, "upsample_fn": "bilinear"}, "upsample_fn"),
        (TinyVAEConfig, {**SDXS_TAESD, "num_decoder_blocks": [3, 3, 1]}, "decoder_block_out_channels"),
        (TinyVAEConfig, {**SDXS_TAESD, "encoder_block_out_channels": [32, 64, 64, 64]}, "encoder_block_out_channels"),
        (KLVAEConfig, small_kl(act_fn="gelu"), "act_fn"),
        (KLVAEConfig, small_kl(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]), "down_block_types"),
        (KLVAEConfig, small_kl(up_block_types=["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]), "up_block_types"),
        (KLVAEConfig, small_kl(norm_num_groups=12), "norm_num_groups"),
        (KLVAEConfig, small_kl(shift_factor="0.1"), "shift_factor"),
    ],
)
def test_unsupported_config_names_the_field(config_cls, config, field):
    with pytest.raises(ConfigError, match=field):
        config_cls.from_dict(config)


def test_configs_ignore_unknown_keys_and_keep_scaling():
    tiny = TinyVAEConfig.from_dict({**SDXS_TAESD, "_diffusers_version": "0.42.1", "block_out_channels": [64] * 4})
    assert tiny == TinyVAEConfig.from_dict(SDXS_TAESD)
    kl = KLVAEConfig.from_dict({**SD21_KL, "shift_factor": 0.0609, "some_future_key": 1})
    assert (kl.scaling_factor, kl.shift_factor, kl.layers_per_block) == (0.18215, 0.0609, 2)

"""Tiny SDXS-shaped diffusers checkpoints with seeded random weights, test frames, and the backend tolerance.

`build_checkpoint(path)` writes what `diffusers.StableDiffusionPipeline.from_pretrained` and
`mlx_sdxs.convert_checkpoint` both read (model_index.json, unet/ vae/ text_encoder/ tokenizer/
scheduler/), so the torch, ONNX, CoreML and MLX backends can all run the same weights.

The layout follows SDXS-512-0.9 at toy width: CrossAttn down/up blocks, no mid block,
`only_cross_attention` on the first level, linear projections; TAESD (or a small KL VAE); a
2-layer CLIP text model; a byte-level CLIP BPE vocabulary generated here (single bytes, their
`</w>` forms, a few merges), so nothing needs downloading.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from mlx_sdxs.backends.reference import write_checkpoint
from mlx_sdxs.tokenizer import CLIPTokenizer, byte_to_unicode
from oracle import randomize_

TEXT_DIM = 32
#: Merges of the generated vocabulary: enough that tokenisation merges inside words.
_MERGES = (("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "r"), ("e", "r</w>"), ("s", "t"))
SCHEDULER_CONFIG = {
    # SDXS-512-0.9's scheduler: a 1-step trailing schedule runs at t=999.
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type=None,
        only_cross_attention=(True, False),
        use_linear_projection=True,
        attention_head_dim=(1, 2),
        cross_attention_dim=TEXT_DIM,
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    return randomize_(unet, seed)


def tiny_vae(seed: int = 1, kind: str = "tiny") -> torch.nn.Module:
    if kind == "tiny":
        vae = AutoencoderTiny(
            encoder_block_out_channels=(16, 16, 16, 16),
            decoder_block_out_channels=(16, 16, 16, 16),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
        )
    elif kind == "kl":
        vae = AutoencoderKL(
            block_out_channels=(32, 32, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            scaling_factor=0.18215,
        )
    else:
        raise ValueError(f"vae kind must be 'tiny' or 'kl', not {kind!r}")
    return randomize_(vae, seed)


def tiny_tokenizer() -> CLIPTokenizer:
    """A tiny CLIP BPE vocabulary: single bytes, their `</w>` forms and a few merges, then the special tokens."""
    symbols = list(byte_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer({t: i for i, t in enumerate(tokens)}, list(_MERGES))


def tiny_text_encoder(vocab_size: int, seed: int = 2) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return randomize_(CLIPTextModel(config), seed)


def build_checkpoint(path: str | Path, seed: int = 0, vae: str = "tiny") -> Path:
    """Write a complete tiny diffusers checkpoint folder at `path` (seeded, so reproducible); returns it."""
    tokenizer = tiny_tokenizer()
    models = {"unet": tiny_unet(seed), "vae": tiny_vae(seed + 1, vae),
              "text_encoder": tiny_text_encoder(len(tokenizer.vocab), seed + 2)}
    return write_checkpoint(path, models, SCHEDULER_CONFIG, tokenizer)


def build_converted(root: Path) -> tuple[Path, Path]:
    """A tiny checkpoint under `root` and its MLX conversion beside it: (diffusers folder, converted folder)."""
    from mlx_sdxs.convert import convert_checkpoint

    checkpoint = build_checkpoint(root / "diffusers")
    return checkpoint, convert_checkpoint(checkpoint, root / "mlx")


def build_sketch_checkpoint(path: str | Path) -> Path:
    """The tiny-sketch preset (the tiny model and a ControlNet for it) as a diffusers checkpoint, every weight
    seeded noise: diffusers starts a ControlNet's zero convolutions at zero, which would hide a dropped residual
    or a control image that never arrives."""
    from mlx_sdxs import presets
    from mlx_sdxs.backends.reference import build_torch_models

    configs = presets.configs("tiny-sketch")
    models = {name: randomize_(model, seed) for seed, (name, model) in enumerate(build_torch_models(configs).items())}
    return write_checkpoint(Path(path), models, configs["scheduler"])


def camera_frames(count: int, height: int = 120, width: int = 160, seed: int = 0) -> list[np.ndarray]:
    """`count` uint8 BGR frames of a slowly panning scene with sensor noise (non-square, to exercise the crop)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for i in range(count):
        shift = 4.0 * i
        scene = np.stack([
            127 + 100 * np.sin((x + shift) / 17.0) * np.cos(y / 23.0),
            127 + 90 * np.cos((x - shift) / 29.0 + y / 31.0),
            60 + 150 * (x + y) / (width + height) + 20 * np.sin(shift / 9.0),
        ], axis=-1)
        scene += rng.normal(0, 6, scene.shape)
        frames.append(np.clip(scene, 0, 255).astype(np.uint8))
    return frames


def assert_pixels_close(actual: np.ndarray, expected: np.ndarray, what: str, mean: float = 1.0, peak: int = 4) -> None:
    """Backend-vs-backend tolerance on uint8 frames: mean |Δ| ≤ mean/255 and max |Δ| ≤ peak/255."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert diff.mean() <= mean and diff.max() <= peak, f"{what}: mean |Δ| {diff.mean():.3f}, max {diff.max()} (/255)"


def assert_controlled_streams_match(actual, expected, frames: list[np.ndarray], what: str) -> None:
    """Two controlled streams give the same pixels frame by frame, through a control mode and strength change
    halfway."""
    assert actual.controlled and expected.controlled
    for i, frame in enumerate(frames):
        if i == len(frames) // 2:
            for stream in (actual, expected):
                stream.set_control_mode("sketch")
                stream.set_control_strength(1.2)
        assert_pixels_close(actual.process(frame), expected.process(frame), f"{what} with control, frame {i}")

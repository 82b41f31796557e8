"""MLX CLIP text encoder vs transformers `CLIPTextModel`: seeded random weights, same ids, fp32 parity 1e-4
on `last_hidden_state`.

Small configs (≈1 s each) cover both activations, short sequences and batches; the two real text
encoders (CLIP-H of SDXS-512-0.9 / SD-Turbo, CLIP-L of SDXS-512-DreamShaper) run at full size (slow).
fp16 weights are checked at 1e-2 relative.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig as TorchCLIPTextConfig
from transformers import CLIPTextModel as TorchCLIPTextModel

import mlx_sdxs
from mlx_sdxs.errors import ConfigError
from mlx_sdxs.models.clip import CLIPTextConfig
from mlx_sdxs.weights import build_model, map_key
from oracle import assert_parity, cached, expected_ops, ops_name, randomize_, save_and_convert

FP16_RTOL = 1e-2

SMALL = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=160,
    num_attention_heads=4,
    num_hidden_layers=3,
    max_position_embeddings=77,
    layer_norm_eps=1e-5,
)


def _prompt_ids(vocab_size: int, batch: int, length: int, seed: int = 1) -> np.ndarray:
    """Ids shaped like tokenizer output: bos, random words, eos, then padding (eos), varying lengths."""
    rng = np.random.default_rng(seed)
    bos, eos = vocab_size - 2, vocab_size - 1
    ids = np.full((batch, length), eos, dtype=np.int64)
    for row in range(batch):
        words = rng.integers(0, vocab_size - 2, size=rng.integers(1, length - 1))
        ids[row, : len(words) + 1] = [bos, *words]
    return ids


def _reference(config: dict, batch: int, length: int, dtype: str) -> Path:
    """transformers' output on seeded weights and ids, and those weights converted (cached, see `oracle`)."""

    def build(folder: Path) -> None:
        vocab = config["vocab_size"]
        torch_config = TorchCLIPTextConfig(**config, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                           pad_token_id=vocab - 1)
        torch_model = randomize_(TorchCLIPTextModel(torch_config), seed=0)
        ids = _prompt_ids(vocab, batch, length)
        with torch.no_grad():
            expected = torch_model(torch.from_numpy(ids)).last_hidden_state
        np.savez(folder / "io.npz", ids=ids, expected=expected.numpy())
        save_and_convert(torch_model, folder, "text_encoder", dtype, keep_source=False)
        del torch_model  # full-size configs: keep torch and MLX weights from coexisting
        gc.collect()

    return cached({"clip": config, "batch": batch, "length": length, "dtype": dtype}, build)


def _check(config: dict, batch: int = 2, length: int = 77, dtype: str = "float32", rtol: float = 1e-4,
           run_dtype: str | None = None, kernels: str | None = None):
    """Run MLX on the weights and ids transformers ran; returns (relative error, seconds per MLX call)."""
    folder = _reference(config, batch, length, dtype)
    io = np.load(folder / "io.npz")
    mx_dtype = getattr(mx, run_dtype or dtype)
    mlx_model = mlx_sdxs.load_text_encoder(folder / "text_encoder-mlx", mx_dtype, kernels)
    assert ops_name(mlx_model) == (kernels or expected_ops(mx_dtype))
    ids = mx.array(io["ids"])
    out = mlx_model(ids)
    mx.eval(out)
    assert out.dtype == mx_dtype
    err = assert_parity(np.array(out.astype(mx.float32)), io["expected"], rtol=rtol, what="last_hidden_state")
    start = time.perf_counter()
    mx.eval(mlx_model(ids))
    return err, time.perf_counter() - start


@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu"])
def test_small_config_parity(hidden_act):
    _check({**SMALL, "hidden_act": hidden_act})


def test_short_sequence_single_prompt():
    _check({**SMALL, "hidden_act": "gelu", "num_attention_heads": 2}, batch=1, length=9)


def test_fp16_weights():
    """fp16 weights and activations (the causal mask is built inside the attention kernel, safe in fp16)."""
    err, _ = _check({**SMALL, "hidden_act": "quick_gelu"}, dtype="float16", rtol=FP16_RTOL)
    print(f"fp16 relative error {err:.2e}")


@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu"])
def test_portable_float16_matches_the_float32_oracle(hidden_act):
    """As a GPU runs it: float32 weights cast to float16, portable kernels (measured ~2e-3 relative)."""
    err, _ = _check({**SMALL, "hidden_act": hidden_act}, run_dtype="float16", kernels="portable", rtol=FP16_RTOL)
    print(f"portable float16 relative error {err:.2e}")


def test_attention_is_causal():
    model = build_model({"architectures": ["CLIPTextModel"], **SMALL}, "text_encoder")
    mx.eval(model.parameters())
    ids = mx.array(_prompt_ids(SMALL["vocab_size"], 1, 20))
    changed = mx.concatenate([ids[:, :10], (ids[:, 10:] + 1) % SMALL["vocab_size"]], axis=1)
    a, b = model(ids), model(changed)
    assert mx.allclose(a[:, :10], b[:, :10]).item() and not mx.allclose(a[:, 10:], b[:, 10:]).item()


def test_parameter_names_mirror_transformers():
    from mlx.utils import tree_flatten

    torch_keys = TorchCLIPTextModel(TorchCLIPTextConfig(**SMALL)).state_dict().keys()
    mapped = {map_key("text_encoder", k) for k in torch_keys} - {None}
    model = build_model({"architectures": ["CLIPTextModel"], **SMALL}, "text_encoder")
    assert mapped == {k for k, _ in tree_flatten(model.parameters())}


def test_config_from_dict():
    text = {**SMALL, "hidden_act": "gelu", "model_type": "clip_text_model", "projection_dim": 512, "bos_token_id": 0}
    assert CLIPTextConfig.from_dict(text) == CLIPTextConfig(**{**SMALL, "hidden_act": "gelu"})
    # A full CLIPConfig: the text tower's settings sit under `text_config`.
    assert CLIPTextConfig.from_dict({"architectures": ["CLIPModel"], "text_config": text}).hidden_act == "gelu"
    # Keys a config.json omits take transformers' defaults.
    assert CLIPTextConfig.from_dict({}) == CLIPTextConfig(
        vocab_size=49408, hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )


@pytest.mark.parametrize(
    "change, field",
    [({"hidden_act": "gelu_new"}, "hidden_act"), ({"hidden_act": "relu"}, "hidden_act"), ({"num_attention_heads": 5}, "hidden_size")],
)
def test_unsupported_config_raises_naming_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        CLIPTextConfig.from_dict({**SMALL, **change})


def test_too_long_input_is_refused():
    model = build_model({"architectures": ["CLIPTextModel"], **SMALL}, "text_encoder")
    with pytest.raises(ValueError, match="length ≤ 77"):
        model(mx.zeros((1, 78), dtype=mx.int32))


def _full_size(shared_dir, checkpoint: str):
    config = json.loads((shared_dir / "configs" / checkpoint / "text_encoder" / "config.json").read_text())
    config = {k: config[k] for k in ("hidden_act", *SMALL)}
    err, seconds = _check(config, batch=1)
    print(f"{checkpoint}: relative error {err:.2e}, MLX fp32 forward at 77 tokens {seconds * 1000:.0f} ms")


@pytest.mark.slow
def test_clip_h_full_size(shared_dir):
    """CLIP-H text encoder (1024 wide, 23 layers, gelu) of SDXS-512-0.9 and SD-Turbo."""
    _full_size(shared_dir, "sdxs-512-0.9")


@pytest.mark.slow
def test_clip_l_full_size(shared_dir):
    """CLIP-L text encoder (768 wide, 12 layers, quick_gelu) of SDXS-512-DreamShaper."""
    _full_size(shared_dir, "sdxs-512-dreamshaper")

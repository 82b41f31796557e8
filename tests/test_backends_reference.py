"""The PyTorch backend runs the shared recipe (`mlx_sdxs.recipe`) as diffusers would, and MLX matches it.

Pixel tolerance between backends (fp32): mean |Δ| ≤ 1/255 and max |Δ| ≤ 4/255 over 5–6 frames with
feedback on and a prompt change. The torch recipe itself is checked against diffusers' scheduler
within `assert_parity`'s 1e-4 relative. Runtime on 2 cores: ~25 s (tiny checkpoints, render size 64).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from checkpoints import assert_pixels_close, build_checkpoint, camera_frames
from mlx_sdxs.backends.base import Backend
from mlx_sdxs.backends.torch_backend import VAEEncoder, load_vae, torch_stream
from mlx_sdxs.frames import to_model_input
from mlx_sdxs.recipe import RecipeSettings, fixed_noise
from oracle import assert_parity, expected_ops, ops_name

SETTINGS = RecipeSettings(render_size=64, feedback=0.1, seed=42)
FRAMES = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tiny-sdxs"))


@pytest.fixture(scope="module")
def kl_checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("tiny-sdxs-kl"), vae="kl")


@pytest.fixture(scope="module")
def torch_run(checkpoint):
    """Outputs and kept latents of the torch backend over the shared frames (computed once)."""
    backend = torch_stream(checkpoint, SETTINGS, prompt="a watercolor painting of the city")
    outputs, latents = [], []
    for frame in camera_frames(FRAMES):
        outputs.append(backend.process(frame))
        latents.append(backend.previous.numpy().copy())
    backend.close()
    return outputs, latents


def test_torch_backend_follows_the_recipe(checkpoint, torch_run):
    """Frame 2 recomputed by hand from the components: blend with frame 1's denoised, noise at t=999, x0."""
    backend = torch_stream(checkpoint, SETTINGS, prompt="a watercolor painting of the city")
    assert isinstance(backend, Backend)
    frames = camera_frames(2)
    backend.process(frames[0])
    previous = backend.previous.clone()

    # diffusers' own scheduler is the oracle for the timestep and ᾱ.
    scheduler = EulerDiscreteScheduler.from_pretrained(checkpoint / "scheduler")
    scheduler.set_timesteps(1)
    timestep = int(scheduler.timesteps[0])
    alpha_bar = scheduler.alphas_cumprod[timestep]
    with torch.inference_mode():
        image = torch.from_numpy(to_model_input(frames[1], 64).transpose(0, 3, 1, 2).copy())
        latents = VAEEncoder(load_vae(checkpoint))(image)
        latents = 0.9 * latents + 0.1 * previous
        noise = torch.from_numpy(fixed_noise(SETTINGS, 4).transpose(0, 3, 1, 2).copy())
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        epsilon = backend.engine.unet(noisy, torch.tensor([float(timestep)]), backend.embeds)
        expected = (noisy - (1 - alpha_bar).sqrt() * epsilon) / alpha_bar.sqrt()

    assert backend.timestep == timestep == 999
    out = backend.process(frames[1])
    assert_parity(backend.previous.numpy(), expected, what="denoised latents")
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert_parity(backend.previous.numpy(), torch_run[1][1], what="denoised vs the shared run")


def test_torch_backend_is_deterministic_and_uses_feedback(checkpoint, torch_run):
    outputs, _ = torch_run
    again = torch_stream(checkpoint, SETTINGS, prompt="a watercolor painting of the city")
    again.warmup()  # must leave the stream state as it found it
    for i, frame in enumerate(camera_frames(FRAMES)):
        np.testing.assert_array_equal(again.process(frame), outputs[i], err_msg=f"frame {i}")

    # The same frame twice gives a different output only through the feedback of the first.
    frame = camera_frames(1)[0]
    with_feedback = torch_stream(checkpoint, SETTINGS, prompt="a watercolor painting of the city")
    first, second = with_feedback.process(frame), with_feedback.process(frame)
    assert np.abs(first.astype(int) - second.astype(int)).max() > 0
    no_feedback = RecipeSettings(render_size=64, feedback=0.0)
    without = torch_stream(checkpoint, no_feedback, prompt="a watercolor painting of the city")
    np.testing.assert_array_equal(without.process(frame), without.process(frame))


def test_prompt_morph_moves_five_percent_per_frame(checkpoint):
    backend = torch_stream(checkpoint, SETTINGS, prompt="a dog")
    target, _ = backend.engine.encode_prompt("an oil painting of a harbour")
    backend.set_prompt("a cat")  # before the first frame: nothing shown yet to morph from, so it is set at once
    start = backend.embeds.numpy()
    np.testing.assert_array_equal(start, backend.engine.encode_prompt("a cat")[0])
    assert np.abs(target - start).max() > 0.1
    frames = camera_frames(4)
    backend.process(frames[0])
    backend.set_prompt("an oil painting of a harbour")
    np.testing.assert_array_equal(backend.embeds.numpy(), start)  # only frames move it
    expected = start
    for frame in frames[1:]:
        backend.process(frame)
        expected = expected + np.float32(0.05) * (target - expected)
        np.testing.assert_allclose(backend.embeds.numpy(), expected, rtol=0, atol=1e-6)


def test_the_engine_says_when_its_weights_are_random(checkpoint, tmp_path):
    """A random checkpoint's engine carries the label every output shows (as the MLX pipeline's does)."""
    from mlx_sdxs import presets
    from mlx_sdxs.backends.reference import write_random_checkpoint
    from mlx_sdxs.backends.torch_backend import TorchEngine

    assert TorchEngine(write_random_checkpoint(tmp_path / "random", "tiny")).label == presets.RANDOM_LABEL
    assert TorchEngine(checkpoint).label is None


def test_kl_vae_checkpoint_scales_latents(kl_checkpoint):
    vae = load_vae(kl_checkpoint)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        expected = vae.encode(image).latent_dist.mean * 0.18215
        assert_parity(VAEEncoder(vae)(image), expected, what="scaled KL latents")
    backend = torch_stream(kl_checkpoint, SETTINGS, prompt="a cat")
    outputs = [backend.process(frame) for frame in camera_frames(2)]
    assert all(o.shape == (64, 64, 3) for o in outputs)


@pytest.mark.parametrize("vae", ["tiny", "kl"])
def test_mlx_backend_matches_torch(checkpoint, kl_checkpoint, vae, tmp_path):
    """Same weights, same frames, a prompt change mid-stream: both backends stay within the pixel tolerance."""
    from mlx_sdxs import convert_checkpoint
    from mlx_sdxs.pipeline import SDXSPipeline

    source = checkpoint if vae == "tiny" else kl_checkpoint
    pipeline = SDXSPipeline.from_weights(convert_checkpoint(source, tmp_path / "mlx-weights"))
    assert ops_name(pipeline.unet) == expected_ops()
    mlx = pipeline.stream(SETTINGS, prompt="a watercolor painting of the city")
    reference = torch_stream(source, SETTINGS, prompt="a watercolor painting of the city")
    for i, frame in enumerate(camera_frames(FRAMES + 1)):
        if i == 3:
            mlx.set_prompt("a pencil sketch")
            reference.set_prompt("a pencil sketch")
        assert_pixels_close(mlx.process(frame), reference.process(frame), f"MLX vs torch ({vae} VAE), frame {i}")
    mlx.close()


def test_non_square_stream_mlx_matches_torch(checkpoint, tmp_path):
    """512x384-style aspect at toy scale (96×64): crop to the aspect, noise and latents of that shape."""
    from mlx_sdxs import convert_checkpoint
    from mlx_sdxs.pipeline import SDXSPipeline

    settings = RecipeSettings(render_size=(96, 64), feedback=0.2, seed_b=7, seed_blend=0.3)
    mlx = SDXSPipeline.from_weights(convert_checkpoint(checkpoint, tmp_path / "mlx")).stream(settings, "a city")
    reference = torch_stream(checkpoint, settings, prompt="a city")
    for i, frame in enumerate(camera_frames(3, height=120, width=90)):  # portrait frames into a landscape render
        ours, theirs = mlx.process(frame), reference.process(frame)
        assert ours.shape == (64, 96, 3)
        assert_pixels_close(ours, theirs, f"non-square MLX vs torch, frame {i}")
    assert np.array(mlx.previous).shape == (1, 8, 12, 4)

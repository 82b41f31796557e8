"""The MLX pipeline against diffusers' own pipelines on the same random weights and the same noise.

Fidelity tolerance (fp32, uint8 pixels): mean |Δ| ≤ 1/255 and max |Δ| ≤ 4/255.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoints import assert_pixels_close, build_converted
from mlx_sdxs.pipeline import SDXSPipeline

SIZE = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_converted(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def mlx_pipe(checkpoint):
    return SDXSPipeline.from_weights(checkpoint[1], name="tiny")


def torch_noise(noise_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(noise_nhwc.transpose(0, 3, 1, 2).copy())


def reference_uint8(images: np.ndarray) -> np.ndarray:
    """diffusers' output_type='np' ([0, 1] floats) → uint8 the way its PIL path rounds."""
    return (images[0] * 255).round().astype(np.uint8)


def noise_for(pipe: SDXSPipeline, seed: int) -> np.ndarray:
    return np.array(pipe.noise(seed, SIZE))


def test_txt2img_matches_stable_diffusion_pipeline(checkpoint, mlx_pipe):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(checkpoint[0], safety_checker=None, requires_safety_checker=False)
    noise = noise_for(mlx_pipe, seed=3)
    prompt = "a photo of the cat in the sun"
    with torch.no_grad():
        expected = ref(prompt, num_inference_steps=1, guidance_scale=0.0, height=SIZE, width=SIZE,
                       latents=torch_noise(noise), output_type="np").images
    ours = mlx_pipe.txt2img(prompt, size=SIZE, noise=noise)
    assert_pixels_close(ours, reference_uint8(expected), "pipeline vs diffusers")


def test_strength_img2img_matches_img2img_pipeline(checkpoint, mlx_pipe, monkeypatch):
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = StableDiffusionImg2ImgPipeline.from_pretrained(checkpoint[0], safety_checker=None,
                                                         requires_safety_checker=False)
    noise = noise_for(mlx_pipe, seed=5)
    # diffusers draws its own noise; hand it ours so both sides add the same tensor.
    monkeypatch.setattr(img2img_module, "randn_tensor", lambda shape, **kw: torch_noise(noise).reshape(shape))
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    prompt = "an oil painting of a harbour"
    # 2 trailing steps at strength 0.5 = exactly one UNet call at t=499, the same t as ours.
    with torch.no_grad():
        expected = ref(prompt, image=image.astype(np.float32)[None] / 255.0, strength=0.5, num_inference_steps=2,
                       guidance_scale=0.0, output_type="np").images
    assert mlx_pipe.scheduler.strength_timestep(0.5) == 499
    ours = mlx_pipe.img2img(image, prompt, strength=0.5, size=SIZE, noise=noise)
    assert_pixels_close(ours, reference_uint8(expected), "pipeline vs diffusers")


def test_prompt_embeddings_are_cached(mlx_pipe):
    first = mlx_pipe.encode_prompt("cached prompt")
    assert mlx_pipe.encode_prompt("cached prompt") is first


def test_stream_feedback_and_morph_change_the_output(mlx_pipe):
    from mlx_sdxs.recipe import RecipeSettings

    image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    stream = mlx_pipe.stream(RecipeSettings(render_size=SIZE, feedback=0.5), "a")
    frames = [stream.process(image) for _ in range(2)]
    assert not np.array_equal(frames[0], frames[1]), "feedback from the previous latent must change frame 2"
    embeds_before = np.array(stream.embeds)
    stream.set_prompt("b")
    stream.process(image)
    moved = np.array(stream.embeds) - embeds_before
    expected = 0.05 * (np.array(stream.target) - embeds_before)
    np.testing.assert_allclose(moved, expected, rtol=1e-5, atol=1e-6)


def test_non_square_txt2img_and_img2img(mlx_pipe):
    image = np.random.default_rng(2).integers(0, 256, (50, 120, 3), dtype=np.uint8)
    assert mlx_pipe.txt2img("x", size=(96, 64)).shape == (64, 96, 3)
    assert mlx_pipe.img2img(image, "x", size=(96, 64)).shape == (64, 96, 3)


def test_size_must_fit_the_unet(mlx_pipe):
    from mlx_sdxs.errors import ImageError

    with pytest.raises(ImageError, match="multiple of 16"):
        mlx_pipe.txt2img("x", size=72)
    with pytest.raises(ImageError, match="size 64x72"):
        mlx_pipe.txt2img("x", size=(64, 72))


def test_sdxs_strength_warning(mlx_pipe):
    pipe = SDXSPipeline(mlx_pipe.unet, mlx_pipe.vae, mlx_pipe.text_encoder, mlx_pipe.tokenizer, mlx_pipe.scheduler,
                        name="IDKiro/sdxs-512-0.9")
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    with pytest.warns(UserWarning, match="mud"):
        pipe.img2img(image, "x", strength=0.5, size=SIZE)


def test_parts_that_do_not_belong_together_are_refused_naming_both(mlx_pipe):
    """A latent-channel or text-width mismatch, or an SD3/FLUX VAE (shift_factor), is a clear error, never a
    silently wrong image."""
    from dataclasses import replace

    from mlx_sdxs.errors import ConfigError

    parts = (mlx_pipe.unet, mlx_pipe.vae, mlx_pipe.text_encoder, mlx_pipe.tokenizer, mlx_pipe.scheduler)

    class Swapped:
        def __init__(self, module, **config):
            self.config = replace(module.config, **config)

    with pytest.raises(ConfigError, match=r"the vae makes 16-channel latents but the unet takes 4 channels"):
        SDXSPipeline(parts[0], Swapped(parts[1], latent_channels=16), *parts[2:])
    with pytest.raises(ConfigError, match=r"the text_encoder makes 768-wide embeddings but the unet attends to \[32\]"):
        SDXSPipeline(parts[0], parts[1], Swapped(parts[2], hidden_size=768), *parts[3:])
    with pytest.raises(ConfigError, match=r"the vae has shift_factor=0.1159"):
        SDXSPipeline(parts[0], Swapped(parts[1], shift_factor=0.1159), *parts[2:])

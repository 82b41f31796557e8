"""The MLX pipeline against diffusers' own pipelines on the same random weights and the same noise.

Latent parity (fp32, before the VAE): max |Δ| ≤ 1e-4 · max|ref| (`oracle.assert_parity`): the same math in
another order and other kernels, a few float32 ulps through the networks, amplified ~15× by the x0 division
by √ᾱ₉₉₉ = 0.068. Pixel fidelity (fp32, uint8): mean |Δ| ≤ 1/255 and max |Δ| ≤ 4/255.
The list API against single calls: mean |Δ| ≤ 1/255 and max |Δ| ≤ 1/255 in float32 (measured identical on
this CPU). In float16, max ≤ 2/255: OpenBLAS picks its GEMM kernel by matrix size, so a batch's products can
round one float16 ulp apart from a single image's (measured: none with MLX's reference BLAS), and the x0
division by √ᾱ₉₉₉ = 0.068 amplifies ε's ulp 14.6-fold (measured here: mean 0.14/255, max 2).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from checkpoints import assert_pixels_close, build_converted, build_sketch_checkpoint
from mlx_sdxs.pipeline import GeneratedImage, MLXEngine, SDXSPipeline
from oracle import FP32_RTOL, assert_parity, mlx_to_nchw

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


@pytest.fixture(scope="module")
def sketch(tmp_path_factory):
    """The tiny Sketch model (a ControlNet, every weight seeded noise): (diffusers folder, converted folder)."""
    from mlx_sdxs import convert_checkpoint

    root = tmp_path_factory.mktemp("sketch")
    folder = build_sketch_checkpoint(root / "diffusers")
    return folder, convert_checkpoint(folder, root / "mlx")


def control_images(count: int) -> list[np.ndarray]:
    """White strokes on black, as the Sketch ControlNet takes them, different for each image."""
    images = []
    for i in range(count):
        image = np.zeros((SIZE, SIZE, 3), np.uint8)
        image[8 + 8 * i : 14 + 8 * i, 4:60] = 255
        image[:, 20 + 6 * i : 24 + 6 * i] = 255
        images.append(image)
    return images


def test_txt2img_latent_matches_stable_diffusion_pipeline_and_unit_noise_does_not(checkpoint, mlx_pipe):
    """SDXS's Euler/trailing scheduler: diffusers starts from σ_max·noise and feeds √(1−ᾱ)·noise to the UNet.
    The old start (unit noise into the UNet) is measurably off, so this check can fail. The decoded image too."""
    from diffusers import StableDiffusionPipeline

    from mlx_sdxs.recipe import one_step

    ref = StableDiffusionPipeline.from_pretrained(checkpoint[0], safety_checker=None, requires_safety_checker=False)
    noise = noise_for(mlx_pipe, seed=3)
    prompt = "a photo of the cat in the sun"

    def reference(output_type: str) -> np.ndarray:
        with torch.no_grad():
            return ref(prompt, num_inference_steps=1, guidance_scale=0.0, height=SIZE, width=SIZE,
                       latents=torch_noise(noise), output_type=output_type).images

    assert_pixels_close(mlx_pipe.txt2img(prompt, size=SIZE, noise=noise), reference_uint8(reference("np")),
                        "pipeline vs diffusers")
    expected = reference("latent")
    ours = mlx_pipe.txt2img(prompt, size=SIZE, noise=noise, output_type="latent")
    assert isinstance(ours, GeneratedImage) and ours.shape == (1, SIZE // 8, SIZE // 8, 4)
    error = assert_parity(ours.transpose(0, 3, 1, 2), expected, what="txt2img latent vs diffusers")
    engine = MLXEngine(mlx_pipe)
    old = one_step(engine, 999, mx.array(noise), engine.condition(mlx_pipe.encode_prompt(prompt)[0]))
    with pytest.raises(AssertionError, match="unit-noise start") as old_error:
        assert_parity(mlx_to_nchw(old), expected, what="unit-noise start")
    print(f"txt2img latent: max relative error {error:.2e} (tolerance {FP32_RTOL:g}); {old_error.value}")


def test_controlnet_txt2img_latent_matches_controlnet_pipeline(sketch):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    folder, converted = sketch
    pipe = SDXSPipeline.from_weights(converted, dtype=mx.float32)
    ref = StableDiffusionControlNetPipeline.from_pretrained(
        folder, controlnet=ControlNetModel.from_pretrained(folder / "controlnet"), safety_checker=None,
        requires_safety_checker=False)
    noise = noise_for(pipe, seed=4)
    prompt, strength, control = "a pencil drawing of a house", 0.7, control_images(1)[0]
    with torch.no_grad():
        expected = ref(prompt, image=control[None].astype(np.float32) / 255.0, num_inference_steps=1,
                       guidance_scale=0.0, height=SIZE, width=SIZE, latents=torch_noise(noise),
                       controlnet_conditioning_scale=strength, output_type="latent").images
    ours = pipe.txt2img(prompt, size=SIZE, noise=noise, control_image=control, control_strength=strength,
                        output_type="latent")
    error = assert_parity(ours.transpose(0, 3, 1, 2), expected, what="ControlNet txt2img latent vs diffusers")
    print(f"ControlNet txt2img latent: max relative error {error:.2e}")


@pytest.mark.parametrize("strength,steps,timestep", [(None, 1, 999), (0.5, 2, 499)])
def test_img2img_latent_matches_img2img_pipeline(checkpoint, mlx_pipe, monkeypatch, strength, steps, timestep):
    """strength=None (t=999) is diffusers' img2img at strength 1 with one step: the image's latent noised to t
    (it still shows through at √ᾱ = 0.068), not txt2img's pure-noise start. Strength 0.5 with 2 trailing steps
    is exactly one UNet call at t=499, ours."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module
    from diffusers import StableDiffusionImg2ImgPipeline

    ref = StableDiffusionImg2ImgPipeline.from_pretrained(checkpoint[0], safety_checker=None,
                                                         requires_safety_checker=False)
    noise = noise_for(mlx_pipe, seed=5)
    # diffusers draws its own noise; hand it ours so both sides add the same tensor.
    monkeypatch.setattr(img2img_module, "randn_tensor", lambda shape, **kw: torch_noise(noise).reshape(shape))
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    prompt = "an oil painting of a harbour"
    with torch.no_grad():
        expected = ref(prompt, image=image.astype(np.float32)[None] / 255.0, strength=strength or 1.0,
                       num_inference_steps=steps, guidance_scale=0.0, output_type="latent").images
    assert mlx_pipe.scheduler.one_step_timestep(strength) == timestep
    ours = mlx_pipe.img2img(image, prompt, strength=strength, size=SIZE, noise=noise, output_type="latent")
    error = assert_parity(ours.transpose(0, 3, 1, 2), expected, what="img2img latent vs diffusers")
    print(f"img2img (t={timestep}) latent: max relative error {error:.2e}")


def test_prompt_embeddings_are_cached(mlx_pipe):
    first = mlx_pipe.encode_prompt("cached prompt")
    assert mlx_pipe.encode_prompt("cached prompt")[0] is first[0] and first[1] is False


def test_a_long_prompt_is_tokenised_once_and_warned_once(mlx_pipe, monkeypatch):
    calls = []
    encode = mlx_pipe.tokenizer.encode
    monkeypatch.setattr(mlx_pipe.tokenizer, "encode", lambda prompt: calls.append(prompt) or encode(prompt))
    prompt = "a very long prompt " * 40
    with pytest.warns(UserWarning, match="truncated") as record:
        mlx_pipe.txt2img([prompt, prompt], size=SIZE)
    assert len(calls) == 1 and sum("truncated" in str(w.message) for w in record) == 1
    assert mlx_pipe.encode_prompt(prompt)[1] is True


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


def assert_each_equals_its_single_call(batched: list, singles: list, what: str, peak: int) -> None:
    assert isinstance(batched, list) and len(batched) == len(singles)
    for i, (a, b) in enumerate(zip(batched, singles)):
        assert isinstance(b, np.ndarray) and not isinstance(b, list)
        assert_pixels_close(a, b, f"{what}, image {i}", mean=1.0, peak=peak)


#: (kernel policy, dtype, max |Δ| in levels of 255: see the module docstring)
LIST_POLICIES = [pytest.param(None, mx.float32, 1, id="default-float32"),
                 pytest.param("portable", mx.float16, 2, id="portable-float16")]


@pytest.mark.parametrize("kernels,dtype,peak", LIST_POLICIES)
def test_list_api_equals_single_calls(checkpoint, kernels, dtype, peak):
    """Prompts, seeds and images as lists (a single value broadcast), in batches of 2 over 3 images: each
    image is its single call's; the conditioning, noise and image are per sample inside a batch."""
    pipe = SDXSPipeline.from_weights(checkpoint[1], dtype=dtype, kernels=kernels, name="tiny")
    prompts, seeds = ["a red fox", "a blue whale", "a green frog"], [1, 2, 3]
    batched = pipe.txt2img(prompts, seed=seeds, size=SIZE, batch_size=2)
    singles = [pipe.txt2img(p, seed=s, size=SIZE) for p, s in zip(prompts, seeds)]
    assert_each_equals_its_single_call(batched, singles, "txt2img list", peak)
    assert not np.array_equal(batched[0], batched[1])  # per-sample prompt and noise: different images

    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8) for _ in range(3)]
    batched = pipe.img2img(images, "an oil painting", seed=5, size=SIZE, batch_size=2)  # prompt and seed broadcast
    singles = [pipe.img2img(image, "an oil painting", seed=5, size=SIZE) for image in images]
    assert_each_equals_its_single_call(batched, singles, "img2img list", peak)


@pytest.mark.parametrize("kernels,dtype,peak", LIST_POLICIES)
def test_list_api_with_per_sample_control_images_and_strengths(sketch, kernels, dtype, peak):
    pipe = SDXSPipeline.from_weights(sketch[1], dtype=dtype, kernels=kernels)
    controls, strengths = control_images(3), [0.3, 1.0, 1.6]
    batched = pipe.txt2img("a house", seed=[4, 4, 4], size=SIZE, control_image=controls, control_strength=strengths,
                           batch_size=3)
    singles = [pipe.txt2img("a house", seed=4, size=SIZE, control_image=c, control_strength=s)
               for c, s in zip(controls, strengths)]
    assert_each_equals_its_single_call(batched, singles, "ControlNet txt2img list", peak)
    assert not np.array_equal(batched[0], batched[2])  # same prompt and seed: only the control differs


def test_list_api_refuses_mismatched_lengths_and_bad_arguments(mlx_pipe):
    with pytest.raises(ValueError, match=r"one length.*prompt: 2, seed: 3"):
        mlx_pipe.txt2img(["a", "b"], seed=[1, 2, 3], size=SIZE)
    with pytest.raises(ValueError, match="empty list"):
        mlx_pipe.txt2img([], size=SIZE)
    with pytest.raises(ValueError, match="batch_size"):
        mlx_pipe.txt2img(["a"], size=SIZE, batch_size=0)
    with pytest.raises(ValueError, match="noise must have the latent's shape"):
        mlx_pipe.txt2img("a", size=SIZE, noise=np.zeros((1, 4, 4, 4), np.float32))
    assert isinstance(mlx_pipe.txt2img(["a"], size=SIZE), list)


def test_random_weights_say_so_on_every_result(mlx_pipe):
    from mlx_sdxs.errors import RandomWeightsWarning

    random = SDXSPipeline.random("random-tiny")
    with pytest.warns(RandomWeightsWarning, match="random weights"):
        image = random.txt2img("a", size=SIZE)
    assert image.random_weights and image[:8].random_weights and image.copy().random_weights
    with pytest.warns(RandomWeightsWarning):
        assert all(result.random_weights for result in random.img2img([image, image], "b", size=SIZE))
    trained = mlx_pipe.txt2img("a", size=SIZE)
    assert type(trained) is GeneratedImage and not trained.random_weights


def test_a_scheduler_diffusers_would_step_differently_is_refused(mlx_pipe):
    """DDIM with set_alpha_to_one false ends its one step at ᾱ[0], not the clean latent: refused, not approximated."""
    from mlx_sdxs.errors import ConfigError
    from mlx_sdxs.scheduler import OneStepScheduler, SchedulerConfig

    config = SchedulerConfig.from_dict({"_class_name": "DDIMScheduler", "timestep_spacing": "trailing",
                                        "set_alpha_to_one": False, "clip_sample": False})
    pipe = SDXSPipeline(mlx_pipe.unet, mlx_pipe.vae, mlx_pipe.text_encoder, mlx_pipe.tokenizer,
                        OneStepScheduler(config), name="ddim")
    with pytest.raises(ConfigError, match="set_alpha_to_one"):
        pipe.txt2img("a", size=SIZE)

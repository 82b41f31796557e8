"""`mlx_sdxs.recipe`: one recipe object on mx.array, np.ndarray and torch.Tensor engines, against the
SDXS camera demo's per-frame numbers computed by hand in float64; the stage clock; prompt and seed blends.

The engines here are toy "models" (pooling, a channel mix, tanh) written once per array library, so the
recipe's own arithmetic — feedback, fixed noise at t=999, x0, prompt morph — is what is compared.
Tolerance: 1e-5 relative (float32 arithmetic against float64).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_sdxs import frames
from mlx_sdxs.errors import ConfigError
from mlx_sdxs.recipe import STAGES, HostFrames, Recipe, RecipeSettings, fixed_noise, seed_noise, slerp
from mlx_sdxs.scheduler import OneStepScheduler, SchedulerConfig

SCHEDULER = OneStepScheduler(SchedulerConfig(timestep_spacing="trailing", steps_offset=1))
MIX = np.array([[0.5, -0.2, 0.1, 0.3], [0.2, 0.4, -0.3, 0.1], [-0.1, 0.3, 0.6, -0.2]], np.float32)  # RGB → 4 ch


def toy_prompt(prompt: str) -> np.ndarray:
    """Deterministic (1, 77, 8) "embeddings" of a prompt."""
    return np.random.default_rng(abs(hash(prompt)) % 2**32).standard_normal((1, 77, 8)).astype(np.float32)


class NumpyToy(HostFrames):
    """encode: 8×8 mean-pool + channel mix; ε: tanh(noisy)·0.5 + mean(embeds) (per row); decode: mix back,
    8× repeat."""

    name, label, latent_channels, scheduler = "numpy-toy", None, 4, SCHEDULER

    def check_thread(self):
        pass

    def from_nhwc(self, a):
        return np.asarray(a, np.float32)

    def to_nhwc(self, a):
        return np.asarray(a, np.float32)

    def encode(self, image):
        b, h, w, c = image.shape
        pooled = image.reshape(b, h // 8, 8, w // 8, 8, c).mean(axis=(2, 4))
        return pooled @ MIX

    def predict_noise(self, noisy, timestep, embeds, control=None):
        return np.tanh(noisy) * 0.5 + embeds.mean(axis=(1, 2)).reshape(-1, 1, 1, 1)  # per stream of a batch

    def decode(self, latent):
        return np.tanh(np.repeat(np.repeat(latent @ MIX.T, 8, axis=1), 8, axis=2))

    def encode_prompt(self, prompt):
        return toy_prompt(prompt), False

    def from_embeds(self, embeds):
        return np.asarray(embeds, np.float32)

    def sync(self, arrays):
        pass

    def close(self):
        pass


class MLXToy(NumpyToy):
    name = "mlx-toy"

    def from_nhwc(self, a):
        return mx.array(a, dtype=mx.float32)

    def to_nhwc(self, a):
        return np.array(a)

    def encode(self, image):
        b, h, w, c = image.shape
        return image.reshape(b, h // 8, 8, w // 8, 8, c).mean(axis=(2, 4)) @ mx.array(MIX)

    def predict_noise(self, noisy, timestep, embeds, control=None):
        return mx.tanh(noisy) * 0.5 + embeds.mean(axis=(1, 2)).reshape(-1, 1, 1, 1)

    def decode(self, latent):
        up = mx.repeat(mx.repeat(latent @ mx.array(MIX.T), 8, axis=1), 8, axis=2)
        return mx.tanh(up)

    def from_embeds(self, embeds):
        return mx.array(embeds)

    def concat(self, arrays):
        return mx.concatenate(arrays)

    def sync(self, arrays):
        mx.eval(*arrays)


class TorchToy(NumpyToy):
    """NCHW, as the torch backend keeps its tensors."""

    name = "torch-toy"

    def __init__(self):
        import torch

        self.torch = torch
        self.mix = torch.from_numpy(MIX)

    def from_nhwc(self, a):
        return self.torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2)))

    def to_nhwc(self, a):
        return a.permute(0, 2, 3, 1).numpy()

    def encode(self, image):
        pooled = self.torch.nn.functional.avg_pool2d(image, 8)
        return self.torch.einsum("bchw,cd->bdhw", pooled, self.mix)

    def predict_noise(self, noisy, timestep, embeds, control=None):
        return self.torch.tanh(noisy) * 0.5 + embeds.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    def decode(self, latent):
        mixed = self.torch.einsum("bdhw,cd->bchw", latent, self.mix)
        return self.torch.tanh(mixed.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3))

    def from_embeds(self, embeds):
        return self.torch.from_numpy(np.asarray(embeds, np.float32))

    def concat(self, arrays):
        return self.torch.cat(arrays)


ENGINES = {"numpy": NumpyToy, "mlx": MLXToy, "torch": TorchToy}


def by_hand(frames_bgr, settings: RecipeSettings, prompts: list[str]) -> list[np.ndarray]:
    """The demo's recipe in float64 numpy, straight from its description."""
    alpha_bar = SCHEDULER.alphas_cumprod[999]
    a, b = np.sqrt(alpha_bar), np.sqrt(1 - alpha_bar)
    noise = seed_noise(settings.seed, settings.render_size, 4).astype(np.float64)
    previous, embeds, outputs = None, None, []
    for frame, prompt in zip(frames_bgr, prompts):
        target = toy_prompt(prompt).astype(np.float64)
        embeds = target if embeds is None else embeds + settings.prompt_morph * (target - embeds)
        image = frames.to_model_input(frame, settings.render_size).astype(np.float64)
        h, w = image.shape[1:3]
        latent = image.reshape(1, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4)) @ MIX.astype(np.float64)
        if previous is not None:
            latent = (1 - settings.feedback) * latent + settings.feedback * previous
        noisy = a * latent + b * noise
        eps = np.tanh(noisy) * 0.5 + embeds.mean()
        previous = (noisy - b * eps) / a
        decoded = np.tanh(np.repeat(np.repeat(previous @ MIX.T.astype(np.float64), 8, axis=1), 8, axis=2))
        outputs.append(((decoded[0] + 1) * 127.5, previous))
    return outputs


def camera_frames(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (60, 100, 3), dtype=np.uint8) for _ in range(count)]


@pytest.mark.parametrize("size", [(64, 64), (96, 64)], ids=["square", "3:2"])
@pytest.mark.parametrize("engine", ENGINES)
def test_one_recipe_on_every_array_type_matches_the_demo(engine, size):
    if engine == "torch":
        pytest.importorskip("torch")
    settings = RecipeSettings(render_size=size, feedback=0.3)
    recipe = Recipe(ENGINES[engine](), settings, "a watercolor painting")
    prompts = ["a watercolor painting"] * 3 + ["a pencil sketch"] * 3
    expected = by_hand(camera_frames(6), settings, prompts)
    for i, (frame, (pixels, latent)) in enumerate(zip(camera_frames(6), expected)):
        if i == 3:
            recipe.set_prompt("a pencil sketch")
        out = recipe.process(frame)
        assert out.shape == (size[1], size[0], 3) and out.dtype == np.uint8
        got = recipe.engine.to_nhwc(recipe.previous)
        np.testing.assert_allclose(got, latent, rtol=1e-5, atol=1e-5, err_msg=f"{engine} frame {i} latent")
        # uint8 BGR of the float64 image, rounded as diffusers does: at most one level off at a .5 boundary
        assert np.abs(out[..., ::-1].astype(int) - np.floor(pixels + 0.5)).max() <= 1


def test_the_demo_runs_at_t_999():
    recipe = Recipe(NumpyToy(), RecipeSettings(render_size=64), "x")
    assert recipe.timestep == 999
    alpha_bar = float(SCHEDULER.alphas_cumprod[999])
    assert alpha_bar == pytest.approx(0.0046600, rel=1e-3)  # √ᾱ ≈ 0.068: the x0 division amplifies 15×


def test_stage_clock_times_every_stage_only_when_profiling():
    recipe = Recipe(MLXToy(), RecipeSettings(render_size=64), "x")
    frame = camera_frames(1)[0]
    recipe.process(frame)
    assert set(recipe.last_stage_ms) == {"host", "frame"}
    recipe.profile_stages = True
    recipe.process(frame)
    assert tuple(recipe.last_stage_ms) == STAGES and all(ms >= 0 for ms in recipe.last_stage_ms.values())


def test_warmup_leaves_the_stream_state_as_it_was():
    recipe = Recipe(NumpyToy(), RecipeSettings(render_size=64), "x")
    first = recipe.process(camera_frames(1)[0])
    fresh = Recipe(NumpyToy(), RecipeSettings(render_size=64), "x")
    fresh.warmup()
    assert not fresh.has_previous
    np.testing.assert_array_equal(fresh.process(camera_frames(1)[0]), first)


def test_slerp_ends_are_exact_and_the_middle_keeps_the_norm():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(1000).astype(np.float32), rng.standard_normal(1000).astype(np.float32)
    assert slerp(a, b, 0.0) is a and slerp(a, b, 1.0) is b
    middle = slerp(a, b, 0.5)
    assert abs(np.linalg.norm(middle) - (np.linalg.norm(a) + np.linalg.norm(b)) / 2) < 0.05 * np.linalg.norm(a)
    assert np.linalg.norm((a + b) / 2) < 0.8 * np.linalg.norm(middle)  # a lerp would shrink the noise


@pytest.mark.parametrize("engine", ["numpy", "mlx"])
def test_prompt_blend_0_and_1_reproduce_each_prompt_exactly_and_half_is_neither(engine):
    frame = camera_frames(1)[0]
    settings = RecipeSettings(render_size=64)

    def run(prompt, prompt_b=None, blend=None):
        recipe = Recipe(ENGINES[engine](), settings)
        recipe.set_prompt(prompt, prompt_b, blend)
        return recipe.process(frame)

    a, b = run("a watercolor"), run("a pencil sketch")
    np.testing.assert_array_equal(run("a watercolor", "a pencil sketch", 0.0), a)
    np.testing.assert_array_equal(run("a watercolor", "a pencil sketch", 1.0), b)
    half = run("a watercolor", "a pencil sketch", 0.5)
    assert not np.array_equal(half, a) and not np.array_equal(half, b)
    live = Recipe(ENGINES[engine](), settings, "a watercolor")
    live.set_prompt(None, "a pencil sketch", 0.0)
    live.set_prompt_blend(1.0)  # morphs: the target is B's embedding exactly
    np.testing.assert_array_equal(np.asarray(live.target), toy_prompt("a pencil sketch"))


def test_seed_blend_0_and_1_reproduce_each_seed_exactly_and_half_is_neither():
    frame = camera_frames(1)[0]

    def run(**settings):
        return Recipe(NumpyToy(), RecipeSettings(render_size=64, **settings), "x").process(frame)

    a, b = run(seed=1), run(seed=2)
    np.testing.assert_array_equal(run(seed=1, seed_b=2, seed_blend=0.0), a)
    np.testing.assert_array_equal(run(seed=1, seed_b=2, seed_blend=1.0), b)
    half = run(seed=1, seed_b=2, seed_blend=0.5)
    assert not np.array_equal(half, a) and not np.array_equal(half, b)
    noise = fixed_noise(RecipeSettings(render_size=512, seed=1, seed_b=2, seed_blend=0.5), 4)
    assert abs(noise.std() - 1.0) < 0.02  # slerp keeps the noise's variance
    live = Recipe(NumpyToy(), RecipeSettings(render_size=64, seed=1, seed_b=2), "x")
    live.set_seed_blend(1.0)
    np.testing.assert_array_equal(live.process(frame), b)
    with pytest.raises(ConfigError, match="second random seed"):
        Recipe(NumpyToy(), RecipeSettings(render_size=64), "x").set_seed_blend(0.5)


def test_settings_refuse_out_of_range_values():
    with pytest.raises(ConfigError, match="feedback must be in"):
        RecipeSettings(feedback=1.5)
    assert RecipeSettings(render_size=(512, 384)).describe_size() == "512x384"


def test_control_images_are_white_strokes_on_black_in_the_frames_layout():
    """Edges: a square's outline, sketch-weight, white on black; sketch: dark strokes on paper, inverted; lines: as is."""
    frame = np.full((256, 256, 3), 200, np.uint8)
    frame[64:192, 64:192] = (30, 60, 90)
    edges = frames.control_image(frame, "edges")
    assert edges.shape == frame.shape and edges.dtype == np.uint8
    assert set(np.unique(edges)) == {0, 255}
    assert (edges[:, :, 0] == edges[:, :, 2]).all()  # grey: channel order cannot matter
    assert edges[128, 128].max() == 0 and edges[0, 0].max() == 0  # flat inside and outside
    outline = edges[128, 56:72, 0]
    assert 3 <= (outline == 255).sum() <= 9, "strokes ~5 px wide at 256, not Canny's one pixel"
    paper = np.full((64, 64, 3), 255, np.uint8)
    paper[30:34] = 0
    np.testing.assert_array_equal(frames.control_image(paper, "sketch"), 255 - paper)
    np.testing.assert_array_equal(frames.control_image(paper, "lines"), paper)


@pytest.mark.parametrize("change, match", [(dict(control="canny"), "control must be one of"),
                                           (dict(control_strength=2.5), "control strength"),
                                           (dict(control_strength=-0.1), "control strength")])
def test_control_settings_refuse_what_is_not_a_mode_or_a_strength(change, match):
    with pytest.raises(ConfigError, match=match):
        RecipeSettings(render_size=64, **change)

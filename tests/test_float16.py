"""float16 overflow stress set: crafted activations and weights whose float16 intermediates would leave
float16's range (±65504) while the true outputs stay finite. Each case asserts a finite output that
matches float32, under both op sets (the CPU set hands half precision to the portable one).

Tolerances: float16 keeps 11 significant bits; single ops are checked at 1e-2 of max|ref|, the
30-frame stream at a mean of 1/255 per pixel (measured: 0.0–0.3/255).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_sdxs.models.layers import GroupNorm
from mlx_sdxs.models.ops import set_ops
from mlx_sdxs.models.unet import GEGLU
from mlx_sdxs.pipeline import SDXSPipeline
from oracle import assert_parity
from policies import op_sets

OPS = op_sets()
RTOL = 1e-2


def _f32(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


@pytest.mark.parametrize("ops", OPS)
def test_geglu_large_value_times_large_negative_gate_is_zero_not_nan(ops):
    """value=300, gate=−300: value·gate = −90000 → −inf in float16, and −inf·Φ(−300) = −inf·0 = NaN; the
    true value·GELU(gate) is 0."""
    value = mx.array([300.0, -300.0, 250.0, 2.0], dtype=mx.float16)
    gate = mx.array([-300.0, -300.0, -250.0, 3.0], dtype=mx.float16)
    out = OPS[ops].geglu(value, gate)
    expected = OPS[ops].geglu(value.astype(mx.float32), gate.astype(mx.float32))
    assert out.dtype == mx.float16 and np.isfinite(_f32(out)).all()
    assert_parity(_f32(out), _f32(expected), RTOL)


def craft_geglu(layer: GEGLU) -> None:
    """Values with std 100 (|value| > 205 for 4 % of them) and gates in −300 ± 15: value·gate leaves float16
    for those, while value·GELU(gate) is 0 (Φ(−285) underflows to 0)."""
    inner, dim = layer.proj.weight.shape[0] // 2, layer.proj.weight.shape[1]
    mx.random.seed(inner + dim)
    value_w = mx.random.normal((inner, dim)) * (100 / dim**0.5)
    gate_w = mx.random.normal((inner, dim)) * (5 / dim**0.5)
    layer.proj.weight = mx.concatenate([value_w, gate_w])
    layer.proj.bias = mx.concatenate([mx.zeros((inner,)), mx.full((inner,), -300.0)])


@pytest.mark.parametrize("ops", OPS)
def test_geglu_module_with_crafted_weights(ops):
    """The GEGLU layer of the UNet: a projection that makes every gate −300-ish and every value ±300."""
    layer = GEGLU(8, 16)
    set_ops(layer, OPS[ops])
    craft_geglu(layer)
    x = mx.random.normal((2, 5, 8))
    expected = layer(x)
    layer.set_dtype(mx.float16)
    out = layer(x.astype(mx.float16))
    assert np.isfinite(_f32(out)).all()
    assert_parity(_f32(out), _f32(expected), RTOL)


@pytest.mark.parametrize("ops", OPS)
def test_attention_with_logits_beyond_float16(ops):
    """Every query has a key equal to it: that q·k of 64-dim vectors of magnitude 100 is 80000 after
    scaling, beyond float16, while the softmax (one-hot) and its value product are ordinary numbers."""
    mx.random.seed(1)
    signs = lambda shape: mx.where(mx.random.normal(shape) > 0, 1.0, -1.0)  # noqa: E731
    q = signs((1, 2, 16, 64)) * 100
    k = mx.concatenate([q, signs((1, 2, 8, 64)) * 100], axis=2)
    v = mx.random.normal((1, 2, 24, 64))
    expected = OPS[ops].attention(q, k, v, 64**-0.5)
    out = OPS[ops].attention(q.astype(mx.float16), k.astype(mx.float16), v.astype(mx.float16), 64**-0.5)
    assert out.dtype == mx.float16 and np.isfinite(_f32(out)).all()
    assert_parity(_f32(out), _f32(expected), RTOL)


@pytest.mark.parametrize("ops", OPS)
def test_group_norm_of_large_mean_input(ops):
    """Activations around 300: their squares (90000) overflow float16; the normalised output is O(1).
    The reference normalises the same float16-rounded input in float32, so only the op's error counts."""
    mx.random.seed(2)
    x = (300 + 10 * mx.random.normal((1, 12, 10, 64))).astype(mx.float16)
    norms = []
    for dtype in (mx.float32, mx.float16):
        norm = GroupNorm(8, 64, eps=1e-6)
        set_ops(norm, OPS[ops])
        norm.weight, norm.bias = mx.linspace(0.5, 1.5, 64), mx.linspace(-0.2, 0.2, 64)
        norm.set_dtype(dtype)
        norms.append(norm)
    expected = norms[0](x.astype(mx.float32), with_silu=True)
    out = norms[1](x, with_silu=True)
    assert out.dtype == mx.float16 and np.isfinite(_f32(out)).all()
    assert_parity(_f32(out), _f32(expected), RTOL)


@pytest.fixture(scope="module")
def crafted_pipelines():
    """The tiny random model in float32 and in float16 (portable), with every transformer's GEGLU crafted
    as above, so that the old value·gate order produced NaN inside the UNet on every frame."""
    pipelines = []
    for dtype in (mx.float32, mx.float16):
        pipe = SDXSPipeline.random("random-tiny", dtype=mx.float32, kernels="portable")
        for _, module in pipe.unet.named_modules():
            if isinstance(module, GEGLU):
                craft_geglu(module)
        if dtype == mx.float16:
            pipe = SDXSPipeline(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                                mx.float16, pipe.name, pipe.label)
            for model in (pipe.unet, pipe.vae, pipe.text_encoder):
                model.set_dtype(mx.float16)
        pipelines.append(pipe)
    return pipelines


def test_bright_frame_feedback_stream_stays_finite_and_matches_float32(crafted_pipelines):
    """30 white frames with strong feedback (0.5): the float32 latent arithmetic of the recipe and the
    float16-safe ops keep every frame finite and within 1/255 (mean) of the float32 stream."""
    from mlx_sdxs.recipe import RecipeSettings

    settings = RecipeSettings(render_size=64, feedback=0.5)
    streams = [pipe.stream(settings, "a bright white room") for pipe in crafted_pipelines]
    white = np.full((48, 64, 3), 255, np.uint8)
    for frame in range(30):
        outputs = [stream.process(white) for stream in streams]
        latent16 = np.array(streams[1].previous)
        assert streams[1].previous.dtype == mx.float32, "the recipe's latents must stay float32"
        assert np.isfinite(latent16).all(), f"frame {frame}: non-finite latent"
        diff = np.abs(outputs[0].astype(int) - outputs[1].astype(int))
        assert diff.mean() <= 1.0, f"frame {frame}: mean |Δ| {diff.mean():.2f}/255"


def randomized_pipeline(dtype: mx.Dtype, kernels: str = "portable") -> SDXSPipeline:
    """The SDXS-512-0.9-shaped pipeline with `_randomize`d weights (the same for every dtype: drawn in
    float32, then cast), so that its output depends on its input."""
    pipe = SDXSPipeline.random("random", dtype=mx.float32, kernels=kernels)
    for seed, model in enumerate((pipe.unet, pipe.vae, pipe.text_encoder)):
        _randomize(model, seed)
        model.set_dtype(dtype)
    return SDXSPipeline(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, dtype, pipe.name,
                        pipe.label)


def _randomize(model, seed: int) -> None:
    """`oracle.randomize_` in MLX: weights with std 1/√fan_in, norm scales 1 ± 0.1, biases ±0.05, so the
    output depends on the input (default inits give nearly flat images)."""
    import math

    from mlx.utils import tree_flatten, tree_unflatten

    mx.random.seed(seed)
    values = []
    for name, param in tree_flatten(model.parameters()):
        noise = mx.random.normal(param.shape)
        if param.ndim >= 2:
            values.append((name, noise / math.sqrt(math.prod(param.shape[1:]))))
        else:
            values.append((name, 0.05 * noise if name.endswith("bias") else 1 + 0.1 * noise))
    model.update(tree_unflatten(values))
    mx.eval(model.parameters())


@pytest.mark.slow
@pytest.mark.policy_independent  # both pipelines pin the portable kernels
def test_float16_pipeline_on_photos_stays_within_2_of_255_of_float32(shared_dir):
    """The SDXS-512-0.9-shaped pipeline as a GPU runs it (float16, portable) against float32, on the shared
    photos at 256² (float16 matmul is slow on a CPU: ~25 s a frame here), the first photo twice so feedback
    is in: mean |Δ| ≤ 2/255 and nothing non-finite. Measured: mean 0.19/255, max 6/255, on images with a
    pixel std of ~100."""
    import cv2

    from mlx_sdxs.recipe import RecipeSettings

    pipelines = [randomized_pipeline(dtype) for dtype in (mx.float32, mx.float16)]
    photos = sorted((shared_dir / "data" / "images").glob("*.png"))
    assert photos
    for index, photo in enumerate(photos):
        frame = cv2.imread(str(photo))
        outputs = []
        for pipe in pipelines:
            stream = pipe.stream(RecipeSettings(render_size=256), "a watercolor painting")
            if index == 0:
                stream.process(frame)  # the second frame then runs with feedback from the first
            outputs.append(stream.process(frame))
            assert np.isfinite(np.array(stream.previous)).all() and np.isfinite(np.array(stream.embeds)).all()
        diff = np.abs(outputs[0].astype(int) - outputs[1].astype(int))
        print(f"{photo.name}: mean |Δ| {diff.mean():.3f}/255, max {diff.max()}/255, std {outputs[0].std():.0f}")
        assert outputs[0].std() > 20, "the reference output should depend on the photo"
        assert diff.mean() <= 2.0, f"{photo.name}: mean |Δ| {diff.mean():.2f}/255"

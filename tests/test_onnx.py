"""ONNX export of the tiny SDXS-shaped checkpoint, and the ONNX Runtime engine vs torch on the same frames.

Tolerance (fp32): pixels mean |Δ| ≤ 1/255, max ≤ 4/255; kept latents within 1e-4 relative.
Runtime on 2 cores: ~50 s (each export ~15 s at render size 256, the smallest the command accepts).
"""

from __future__ import annotations

import numpy as np
import pytest

from checkpoints import (assert_controlled_streams_match, assert_pixels_close, build_checkpoint,
                         build_sketch_checkpoint, camera_frames)
from mlx_sdxs.backends.base import Backend
from mlx_sdxs.backends.exported import CONTROL_INPUTS, UNET_INPUTS, ExportManifest
from mlx_sdxs.backends.onnx_backend import onnx_stream
from mlx_sdxs.backends.torch_backend import torch_stream
from mlx_sdxs.errors import ConfigError
from mlx_sdxs.recipe import RecipeSettings
from oracle import assert_parity

pytestmark = pytest.mark.policy_independent  # see pyproject.toml

pytest.importorskip("onnxruntime")
SETTINGS = RecipeSettings(render_size=256, feedback=0.1, seed=7)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    checkpoint = build_checkpoint(root / "checkpoint")
    from mlx_sdxs.cli import main  # the installed command, `mlx-sdxs export onnx`

    assert main(["export", "onnx", str(checkpoint), str(root / "onnx"), "--render-size", "256"]) == 0
    return checkpoint, root / "onnx"


def test_export_writes_graphs_and_manifest(exported):
    import onnxruntime as ort

    _, onnx_dir = exported
    manifest = ExportManifest.load(onnx_dir, "onnx")
    assert manifest.render_size == [256, 256] and manifest.text_dim == 32 and manifest.latent_channels == 4
    expected = {"unet": (["sample", "timestep", "encoder_hidden_states"], ["noise_pred"]),
                "vae_encoder": (["image"], ["latents"]), "vae_decoder": (["latents"], ["image"])}
    for component, (inputs, outputs) in expected.items():
        session = ort.InferenceSession(str(onnx_dir / manifest.files[component]), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == inputs
        assert [o.name for o in session.get_outputs()] == outputs
        assert [list(i.shape) for i in session.get_inputs()] == list(manifest.inputs[component].values())
    with pytest.raises(ConfigError, match="exported for render size 256x256.*re-export it at render size 320x256"):
        onnx_stream(onnx_dir, RecipeSettings(render_size=(320, 256)))


def test_onnx_backend_matches_torch(exported):
    checkpoint, onnx_dir = exported
    prompt = "a neon city at night"
    onnx_backend = onnx_stream(onnx_dir, SETTINGS, prompt=prompt)
    torch_backend = torch_stream(checkpoint, SETTINGS, prompt=prompt)
    assert isinstance(onnx_backend, Backend)
    onnx_backend.warmup()
    for i, frame in enumerate(camera_frames(5)):
        if i == 3:  # a prompt change mid-stream morphs both the same way
            onnx_backend.set_prompt("a pencil sketch")
            torch_backend.set_prompt("a pencil sketch")
        assert_pixels_close(onnx_backend.process(frame), torch_backend.process(frame), f"ONNX vs torch, frame {i}")
        assert_parity(onnx_backend.previous, torch_backend.previous, what=f"latents, frame {i}")
    np.testing.assert_allclose(onnx_backend.embeds, torch_backend.embeds.numpy(), rtol=0, atol=1e-5)
    onnx_backend.profile_stages = True
    onnx_backend.process(camera_frames(1)[0])
    assert set(onnx_backend.last_stage_ms) == {"preprocess", "encode", "unet", "decode", "postprocess"}
    onnx_backend.close()
    onnx_backend.close()


def test_the_sketch_model_exports_its_controlnet_inside_the_unet_graph(tmp_path):
    """ControlNet + UNet as one ONNX graph vs torch's ControlNet then UNet, on the same control images through a
    mode and strength change; at strength 0 the output moves by far more than the tolerance (the control image
    reaches the graph)."""
    from mlx_sdxs.cli import main

    checkpoint = build_sketch_checkpoint(tmp_path / "checkpoint")
    assert main(["export", "onnx", str(checkpoint), str(tmp_path / "onnx"), "--render-size", "256"]) == 0
    manifest = ExportManifest.load(tmp_path / "onnx", "onnx")
    assert list(manifest.inputs["unet"]) == list(UNET_INPUTS + CONTROL_INPUTS)
    assert manifest.controlnet == str((checkpoint / "controlnet").resolve())
    settings = RecipeSettings(render_size=256, seed=7, control="edges", control_strength=0.8)
    onnx_backend = onnx_stream(tmp_path / "onnx", settings, prompt="a pencil drawing of a house")
    torch_backend = torch_stream(checkpoint, settings, prompt="a pencil drawing of a house")
    frames = camera_frames(4)
    assert_controlled_streams_match(onnx_backend, torch_backend, frames, "ONNX vs torch")
    steered = onnx_backend.process(frames[0])
    onnx_backend.set_control_strength(0.0)
    diff = np.abs(onnx_backend.process(frames[0]).astype(int) - steered.astype(int))
    assert diff.mean() > 8, f"the control image barely moves the ONNX output (mean |Δ| {diff.mean():.2f}/255)"

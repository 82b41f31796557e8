"""CoreML export (works on any OS) and the CoreML backend (predicts on macOS only).

Conversion runtime on 2 cores: ~20 s for the tiny SDXS-shaped checkpoint at render size 256;
the slow full-size SDXS-512-0.9 UNet conversion ~50 s and 3.4 GiB peak RSS.
"""

from __future__ import annotations

import json
import platform

import pytest
import torch

from checkpoints import assert_pixels_close, build_checkpoint, build_sketch_checkpoint, camera_frames
from mlx_sdxs.backends import COMPUTE_UNITS
from mlx_sdxs.backends.exported import ExportManifest
from mlx_sdxs.errors import BackendUnavailable, ConfigError
from mlx_sdxs.recipe import RecipeSettings

ct = pytest.importorskip("coremltools")
from mlx_sdxs.backends.export import Graph, build_graphs  # noqa: E402  (imports torch + diffusers; after the skip)
from mlx_sdxs.backends.export.coreml import convert_graph, export_coreml  # noqa: E402

pytestmark = pytest.mark.policy_independent  # see pyproject.toml

ON_MACOS = platform.system() == "Darwin"
ARRAY_TYPES = ct.proto.FeatureTypes_pb2.ArrayFeatureType
FLOAT32, FLOAT16 = ARRAY_TYPES.FLOAT32, ARRAY_TYPES.FLOAT16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("coreml") / "checkpoint")


@pytest.fixture(scope="module")
def packages(checkpoint, tmp_path_factory):
    return export_coreml(checkpoint, tmp_path_factory.mktemp("coreml-out") / "packages", render_size=256)


def features(spec, which: str) -> dict[str, tuple[list[int], int]]:
    return {f.name: (list(f.type.multiArrayType.shape), f.type.multiArrayType.dataType)
            for f in getattr(spec.description, which)}


def test_export_writes_ml_programs_with_the_expected_interface(packages, checkpoint):
    manifest = ExportManifest.load(packages, "coreml")
    assert manifest.render_size == [256, 256] and manifest.precision == "float16"
    assert manifest.checkpoint == str(checkpoint.resolve())
    expected = {
        "unet": ({"sample": ([1, 4, 32, 32], FLOAT32), "timestep": ([1], FLOAT32),
                  "encoder_hidden_states": ([1, 77, 32], FLOAT32)},
                 {"noise_pred": ([1, 4, 32, 32], FLOAT16)}),
        "vae_encoder": ({"image": ([1, 3, 256, 256], FLOAT32)}, {"latents": ([1, 4, 32, 32], FLOAT16)}),
        "vae_decoder": ({"latents": ([1, 4, 32, 32], FLOAT32)}, {"image": ([1, 3, 256, 256], FLOAT16)}),
    }
    assert set(manifest.files) == set(expected)
    for component, (inputs, outputs) in expected.items():
        spec = ct.models.MLModel(str(packages / manifest.files[component]), skip_model_load=True).get_spec()
        assert spec.WhichOneof("Type") == "mlProgram", component
        assert features(spec, "input") == inputs, component
        assert features(spec, "output") == outputs, component
        assert manifest.inputs[component] == {name: shape for name, (shape, _) in inputs.items()}
    assert json.loads((packages / "manifest.json").read_text())["latents_scaled"] is True


def test_the_sketch_model_converts_with_its_controlnet_inside_the_unet_graph(tmp_path):
    checkpoint = build_sketch_checkpoint(tmp_path / "checkpoint")
    graph = build_graphs(checkpoint, (256, 256), checkpoint / "controlnet")["unet"]
    spec = convert_graph(graph, "float16", "macOS14").get_spec()
    assert features(spec, "input") == {
        "sample": ([1, 4, 32, 32], FLOAT32), "timestep": ([1], FLOAT32), "encoder_hidden_states": ([1, 77, 64], FLOAT32),
        "controlnet_cond": ([1, 3, 256, 256], FLOAT32), "conditioning_scale": ([1], FLOAT32)}
    assert features(spec, "output") == {"noise_pred": ([1, 4, 32, 32], FLOAT16)}


def test_export_rejects_unsupported_render_sizes(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"render size sides must be multiples of 64 from 256 to 1024 for an "
                                          r"exported graph \(ONNX, CoreML\), got 300x300"):
        export_coreml(checkpoint, tmp_path / "out", render_size=300)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(ON_MACOS, reason="checks the off-macOS refusal")
def test_backend_off_macos_refuses_before_loading_anything(tmp_path):
    from mlx_sdxs.backends.coreml import coreml_stream

    with pytest.raises(BackendUnavailable, match=r"^CoreML prediction only exists on macOS; conversion works here: "
                                                  r"mlx-sdxs export coreml"):
        coreml_stream(tmp_path / "does-not-exist", RecipeSettings())


@pytest.mark.skipif(not ON_MACOS, reason="coremltools can only predict on macOS")
def test_coreml_backend_matches_torch(checkpoint, tmp_path):
    from mlx_sdxs.backends.coreml import coreml_stream
    from mlx_sdxs.backends.torch_backend import torch_stream

    settings = RecipeSettings(render_size=256)
    packages = export_coreml(checkpoint, tmp_path / "fp32", render_size=256, precision="float32")
    coreml = coreml_stream(packages, settings, "a neon city", compute_units="CPU_ONLY")
    reference = torch_stream(checkpoint, settings, prompt="a neon city")
    for i, frame in enumerate(camera_frames(5)):
        assert_pixels_close(coreml.process(frame), reference.process(frame), f"CoreML vs torch, frame {i}")
    coreml.close()


@pytest.mark.skipif(not ON_MACOS, reason="coremltools can only predict on macOS")
def test_coreml_backend_runs_fp16_on_every_compute_unit(packages):
    from mlx_sdxs.backends.coreml import coreml_stream

    for units in COMPUTE_UNITS:
        backend = coreml_stream(packages, RecipeSettings(render_size=256), "a cat", compute_units=units)
        out = backend.process(camera_frames(1)[0])
        assert out.shape == (256, 256, 3), units
        backend.close()


@pytest.mark.slow
def test_full_size_sdxs_unet_converts(shared_dir, tmp_path):
    """The SDXS-512-0.9 UNet at 512 through the same route (default init: only the interface is checked)."""
    from diffusers import UNet2DConditionModel

    from mlx_sdxs.backends.torch_backend import UNetEpsilon

    config = json.loads((shared_dir / "configs" / "sdxs-512-0.9" / "unet" / "config.json").read_text())
    unet = UNet2DConditionModel.from_config(config).eval()
    inputs = {"sample": torch.randn(1, 4, 64, 64), "timestep": torch.tensor([999.0]),
              "encoder_hidden_states": torch.randn(1, 77, 1024)}
    model = convert_graph(Graph(UNetEpsilon(unet), inputs, "noise_pred"), "float16", "macOS14")
    del unet
    model.save(str(tmp_path / "unet.mlpackage"))
    spec = ct.models.MLModel(str(tmp_path / "unet.mlpackage"), skip_model_load=True).get_spec()
    assert features(spec, "input") == {"sample": ([1, 4, 64, 64], FLOAT32), "timestep": ([1], FLOAT32),
                                       "encoder_hidden_states": ([1, 77, 1024], FLOAT32)}
    assert features(spec, "output") == {"noise_pred": ([1, 4, 64, 64], FLOAT16)}

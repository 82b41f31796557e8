"""The MLX runtime never needs PyTorch: load and run converted models in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

ORACLES = ("torch", "diffusers", "transformers", "coremltools", "onnxruntime")


@pytest.mark.timeout(180)
def test_mlx_inference_imports_no_oracle(tmp_path):
    pytest.importorskip("torch")
    from checkpoints import build_checkpoint
    from mlx_sdxs.convert import convert_checkpoint

    converted = convert_checkpoint(build_checkpoint(tmp_path / "ckpt"), tmp_path / "mlx")
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import mlx_sdxs
        from mlx_sdxs.pipeline import SDXSPipeline
        from mlx_sdxs.backends.base import RecipeSettings
        from mlx_sdxs.backends.mlx_backend import MLXBackend
        pipe = SDXSPipeline.from_weights({str(converted)!r})
        assert pipe.txt2img("a cat", size=64).shape == (64, 64, 3)
        backend = MLXBackend(pipe, RecipeSettings(render_size=64), "a cat")
        assert backend.process(np.zeros((48, 80, 3), np.uint8)).shape == (64, 64, 3)
        unet = mlx_sdxs.load_unet({str(converted / "unet")!r})
        tok = mlx_sdxs.load_tokenizer({str(converted / "tokenizer")!r})
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {ORACLES!r})
        print("LOADED", loaded)
        sys.exit(1 if loaded else 0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout + result.stderr

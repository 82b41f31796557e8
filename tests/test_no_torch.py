"""The MLX runtime never needs PyTorch: load and run converted models in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

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
        from mlx_sdxs.recipe import RecipeSettings
        pipe = SDXSPipeline.from_weights({str(converted)!r})
        assert pipe.txt2img("a cat", size=64).shape == (64, 64, 3)
        backend = pipe.stream(RecipeSettings(render_size=64), "a cat")
        assert backend.process(np.zeros((48, 80, 3), np.uint8)).shape == (64, 64, 3)
        unet = mlx_sdxs.load_unet({str(converted / "unet")!r})
        tok = mlx_sdxs.load_tokenizer({str(converted / "tokenizer")!r})
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {ORACLES!r})
        print("LOADED", loaded)
        sys.exit(1 if loaded else 0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout + result.stderr


IMPORT_RULES = {
    # module: packages it must not load (the layers of docs/ARCHITECTURE.md)
    "mlx_sdxs": ("cv2", "mlx_sdxs.camera", "mlx_sdxs.backends", "mlx_sdxs.pipeline", *ORACLES),
    "mlx_sdxs.pipeline": ("cv2", "mlx_sdxs.camera", "mlx_sdxs.backends", "mlx_sdxs.studio", *ORACLES),
    "mlx_sdxs.models.unet": ("cv2", "mlx_sdxs.runtime", "mlx_sdxs.weights", "mlx_sdxs.pipeline", *ORACLES),
    "mlx_sdxs.recipe": ("cv2", "mlx.core", "mlx_sdxs.pipeline", "mlx_sdxs.camera", *ORACLES),
    "mlx_sdxs.camera.app": ("mlx_sdxs.pipeline", "mlx_sdxs.studio", "starlette", "uvicorn", *ORACLES),
    "mlx_sdxs.backends.torch_backend": ("mlx_sdxs.pipeline", "mlx_sdxs.camera"),
}


@pytest.mark.parametrize("module", IMPORT_RULES)
def test_layers_do_not_reach_up(module):
    """A fresh interpreter imports `module` and lists what came with it."""
    if module == "mlx_sdxs.backends.torch_backend":
        pytest.importorskip("torch")
    script = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    bad = sorted(m for m in loaded for banned in IMPORT_RULES[module] if m == banned or m.startswith(banned + "."))
    assert not bad, f"importing {module} loads {bad}"


PACKAGE = Path(__file__).resolve().parents[1] / "mlx_sdxs"


def _imported_names(path: Path) -> list[str]:
    """Every module `path` imports, read from the source, so a lazy import inside a function counts."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_models_import_only_mlx_numpy_and_errors():
    """Every module of `mlx_sdxs.models` imports MLX, numpy, the standard library, the errors module and
    its own siblings — nothing above."""
    allowed_roots = {"mlx", "numpy", "__future__", "math", "dataclasses", "functools", "typing"}
    for path in (PACKAGE / "models").glob("*.py"):
        for name in _imported_names(path):
            ok = name.split(".")[0] in allowed_roots or name == "mlx_sdxs.errors" or \
                name.startswith("mlx_sdxs.models")
            assert ok, f"{path.name} imports {name}"


def test_only_the_backends_import_the_oracles():
    """torch, diffusers, transformers, onnxruntime and coremltools appear only under `mlx_sdxs/backends/`."""
    for path in PACKAGE.rglob("*.py"):
        if PACKAGE / "backends" in path.parents:
            continue
        oracles = [name for name in _imported_names(path) if name.split(".")[0] in ORACLES]
        assert not oracles, f"{path.relative_to(PACKAGE)} imports {oracles}"

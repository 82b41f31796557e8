"""The MLX runtime never needs PyTorch: load and run converted models in a fresh interpreter."""

from __future__ import annotations

import ast
import re
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
    # module: packages it must not load (the layers of docs/ARCHITECTURE.md), checked in a fresh interpreter
    "mlx_sdxs": ("cv2", "mlx_sdxs.camera", "mlx_sdxs.backends", "mlx_sdxs.pipeline", *ORACLES),
    "mlx_sdxs.pipeline": ("cv2", "mlx_sdxs.camera", "mlx_sdxs.backends", "mlx_sdxs.studio", *ORACLES),
    "mlx_sdxs.models.unet": ("cv2", "mlx_sdxs.runtime", "mlx_sdxs.weights", "mlx_sdxs.pipeline", *ORACLES),
    "mlx_sdxs.recipe": ("cv2", "mlx.core", "mlx_sdxs.pipeline", "mlx_sdxs.camera", *ORACLES),
    "mlx_sdxs.camera.app": ("mlx_sdxs.pipeline", "mlx_sdxs.studio", "starlette", "uvicorn", *ORACLES),
    "mlx_sdxs.camera.session": ("mlx_sdxs.pipeline", "mlx_sdxs.studio", "starlette", "uvicorn", *ORACLES),
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
    """Every module `path` imports, read from the source, so a lazy import inside a function counts, and so does
    one by name (`importlib.import_module("…")`; the package facade's `__getattr__` table, `mlx_sdxs._LAZY`).
    `from package import module` counts as that module, `from package import name` as the package."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [_from_import(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module") \
                and node.args and isinstance(node.args[0], ast.Constant):
            names.append(node.args[0].value)
    if path == PACKAGE / "__init__.py":
        import mlx_sdxs

        names += list(mlx_sdxs._LAZY.values())
    return names


def _from_import(package: str, name: str) -> str:
    """`from package import name`: the submodule `package.name` where there is one, else `package` itself."""
    found = PACKAGE.parent.joinpath(*package.split("."), name)
    return f"{package}.{name}" if found.is_dir() or found.with_suffix(".py").is_file() else package


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


ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"


def documented_layers() -> dict[str, int]:
    """docs/ARCHITECTURE.md's layer table: module or package name → layer (`L3  recipe.py hub.py …  text`)."""
    layers = {}
    for line in ARCHITECTURE.read_text().splitlines():
        match = re.match(r"L(\d)  (.+?)(?:  |$)", line)
        if match:
            for entry in match.group(2).split():
                layers["mlx_sdxs." + entry.removesuffix(".py").removesuffix("/")] = int(match.group(1))
    layers["mlx_sdxs"] = layers.pop("mlx_sdxs.__init__")
    return layers


def _layer(module: str, layers: dict[str, int]) -> int | None:
    """The layer of `module` (its own entry, else its package's), None for a module outside mlx_sdxs."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in layers and (name != "mlx_sdxs" or module == "mlx_sdxs"):
            return layers[name]
    return None


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def test_no_module_imports_a_layer_above_its_own_not_even_inside_a_function():
    layers = documented_layers()
    assert len(set(layers.values())) == 9, "the table in docs/ARCHITECTURE.md was not read"
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        own = _layer(module, layers)
        assert own is not None, f"{module} is not in docs/ARCHITECTURE.md's layer table"
        for name in _imported_names(path):
            theirs = _layer(name, layers)
            assert theirs is None or theirs <= own, f"{module} (L{own}) imports {name} (L{theirs})"


def test_camera_knows_backends_only_by_their_protocol_and_nothing_imports_bench_or_tests():
    for path in PACKAGE.rglob("*.py"):
        names = _imported_names(path)
        assert not [n for n in names if n.split(".")[0] in ("bench", "tests")], path
        if PACKAGE / "camera" in path.parents:
            reached = [n for n in names if n.startswith("mlx_sdxs.backends") and n != "mlx_sdxs.backends.base"]
            assert not reached, f"{path.name} imports {reached}"
            assert "mlx_sdxs.pipeline" not in names, path.name


@pytest.mark.timeout(60)
def test_a_render_size_no_export_can_have_is_refused_before_torch_loads():
    script = textwrap.dedent("""
        import sys
        from mlx_sdxs.backends import BackendChoice, open_backend
        from mlx_sdxs.errors import ConfigError
        from mlx_sdxs.recipe import RecipeSettings
        try:
            open_backend(BackendChoice(backend="onnx"), RecipeSettings(render_size=128))
        except ConfigError as exc:
            print(exc)
        sys.exit(1 if "torch" in sys.modules else 0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "multiples of 64 from 256 to 1024 for an exported graph" in result.stdout

"""mlx-sdxs: real-time one-step diffusion (SDXS-512) in MLX.

Importing the package first loads an optimised BLAS on Linux (see `_blas`), so import
`mlx_sdxs` before `mlx.core` for fast CPU inference.
"""

from mlx_sdxs import _blas

_blas.preload()

from mlx_sdxs.errors import SDXSError  # noqa: E402

__version__ = "0.1.0"

_LAZY = {
    "load_unet": "mlx_sdxs.weights",
    "load_vae": "mlx_sdxs.weights",
    "load_text_encoder": "mlx_sdxs.weights",
    "load_tokenizer": "mlx_sdxs.tokenizer",
    "convert_checkpoint": "mlx_sdxs.convert",
    "SDXSPipeline": "mlx_sdxs.pipeline",
}

__all__ = ["SDXSError", "__version__", *_LAZY]


def __getattr__(name: str):
    # Lazy so that `import mlx_sdxs` (e.g. for the camera loop with another backend) stays cheap.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlx_sdxs' has no attribute {name!r}")

import os
import signal
import sys
from pathlib import Path

import pytest

# Tests run with whatever OPENBLAS_* the machine sets (CI keeps them); only the bench unsets them.
sys.path.insert(0, str(Path(__file__).parent))
# Float32 parity is checked at float32 precision: on CUDA, MLX runs float32 matmuls and convolutions in TF32
# (10-bit mantissas, measured 3e-4 to 8e-3 against the float32 oracles) unless this is 0. MLX reads it once,
# before its first float32 matmul; float16, the GPU's own dtype, is unaffected.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx_sdxs  # noqa: E402,F401  (loads the fast BLAS before any test imports mlx.core)

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"reference material {SHARED} is absent (it exists beside the checkout in CI only)")
    return SHARED


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_raises():
    """Ctrl-C tests send SIGINT to the main thread; a shell that starts the suite in the background hands
    it SIGINT *ignored*, and Python then never raises KeyboardInterrupt. Make it raise, as in a terminal."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)

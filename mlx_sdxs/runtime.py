"""What this process computes on — device, default dtype, kernel policy, streams — decided here, once.

The kernel policy (`MLX_SDXS_KERNELS=auto|portable|cpu|cuda`, or `--kernels` on every command):
- `portable`: MLX built-ins only (`models.ops.PortableOps`), what Metal runs;
- `cpu`: the CPU rewrites (`models.cpu_ops.CPUOps`, or the native kernels when they are built);
- `cuda`: the portable set with custom CUDA kernels (`models.cuda_ops.CUDAOps`), on an NVIDIA GPU only;
- `auto` (default): `cpu` for a float32 model on the CPU, `cuda` on a CUDA GPU, `portable` everywhere else.

The policy is applied to each model when it is loaded (`apply_kernels`), so `load_unet` and the
pipeline get the same choice; the models themselves never ask which device they are on.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

from mlx_sdxs.errors import ConfigError, SDXSError
from mlx_sdxs.models.cpu_ops import CPUOps
from mlx_sdxs.models.cuda_ops import CUDAOps
from mlx_sdxs.models.ops import PORTABLE, PortableOps, set_ops

KERNEL_POLICIES = ("auto", "portable", "cpu", "cuda")
KERNELS_ENV = "MLX_SDXS_KERNELS"
#: The dtype names the CLI, the converter and the bench accept, and what they mean to MLX.
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

CACHE_ENV = "MLX_SDXS_CACHE"
_PTX_ENV = "MLX_PTX_CACHE_DIR"
_GRAPHS_ENV = "MLX_USE_CUDA_GRAPHS"
_SEEN_FILE = "kernels-seen.json"

_CPU_OPS = CPUOps()
_CUDA_OPS = CUDAOps()
_selected_policy: str | None = None
_thread = threading.local()


def cache_root() -> Path:
    """`$MLX_SDXS_CACHE`, else `$XDG_CACHE_HOME/mlx-sdxs` (`~/.cache/mlx-sdxs`): what mlx-sdxs keeps between
    runs that is not weights (compiled GPU kernels, which render sizes were compiled)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-sdxs"


# MLX compiles fused and custom CUDA kernels with NVRTC on first use and keeps the PTX in a temporary folder
# by default (gone at reboot: tens of seconds again). Keep it in the cache instead, unless the user chose.
# MLX reads the variable once, at its first CUDA compilation, which comes after this module is imported.
os.environ.setdefault(_PTX_ENV, str(cache_root() / "cuda-ptx" / mx.__version__))
# MLX's CUDA backend records every kernel into CUDA graphs on the host and replays them; for a frame of ~400
# kernels that recording is the frame's cost. Launching them one by one measured 2.3× faster on an H200
# (512², one frame in flight: 7.7 ms instead of 17.6; the camera loop 110 AI FPS instead of 52;
# bench/results/gpu-h200-20261204.md). Read once, at MLX's first GPU work; the user's setting wins.
os.environ.setdefault(_GRAPHS_ENV, "0")


def _seen_path() -> Path:
    return cache_root() / _SEEN_FILE


def compiled_before(tag: str) -> bool:
    """Whether kernels for `tag` (a backend and render size) were compiled on this machine, by this MLX."""
    try:
        return f"mlx {mx.__version__}: {tag}" in json.loads(_seen_path().read_text())
    except (OSError, ValueError):
        return False


def remember_compiled(tag: str) -> None:
    """Record `tag` as compiled (see `compiled_before`); a cache that cannot be written is skipped."""
    path = _seen_path()
    try:
        seen = set(json.loads(path.read_text())) if path.is_file() else set()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        partial.write_text(json.dumps(sorted(seen | {f"mlx {mx.__version__}: {tag}"}), indent=1))
        os.replace(partial, path)
    except (OSError, ValueError):
        pass


def on_gpu() -> bool:
    """True when new arrays are computed on a GPU (Metal or CUDA)."""
    return mx.default_device().type == mx.DeviceType.gpu


def on_cuda() -> bool:
    """True when new arrays are computed on an NVIDIA GPU (MLX's CUDA backend)."""
    return on_gpu() and mx.cuda.is_available()


def default_dtype() -> mx.Dtype:
    """float16 on a GPU; float32 on the CPU, where MLX's half-precision matmul is far slower."""
    return mx.float16 if on_gpu() else mx.float32


def dtype_name(dtype: mx.Dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def parse_dtype(name: str | None) -> mx.Dtype:
    """A dtype name ("auto"/None = this machine's default) → `mx.Dtype`; unknown names are a ConfigError."""
    if name in (None, "auto"):
        return default_dtype()
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_policy(policy: str, where: str) -> str:
    if policy not in KERNEL_POLICIES:
        raise ConfigError(f"{where}={policy!r} is not a kernel policy (choose {', '.join(KERNEL_POLICIES)})")
    return policy


def select_kernels(policy: str | None) -> None:
    """Set this process's kernel policy (the CLI's `--kernels`); None returns to the environment's."""
    global _selected_policy
    _selected_policy = None if policy is None else _check_policy(policy, "kernels")


def requested_kernels() -> str:
    """The policy asked for: `select_kernels`' choice, else $MLX_SDXS_KERNELS, else "auto"."""
    if _selected_policy is not None:
        return _selected_policy
    return _check_policy(os.environ.get(KERNELS_ENV) or "auto", KERNELS_ENV)


def resolve_kernels(dtype: mx.Dtype, policy: str | None = None) -> str:
    """"portable", "cpu" or "cuda" for a model computing in `dtype` on the default device."""
    policy = _check_policy(policy, "kernels") if policy is not None else requested_kernels()
    if policy == "auto":
        return "cuda" if on_cuda() else "cpu" if not on_gpu() and dtype == mx.float32 else "portable"
    if policy == "cuda" and not on_cuda():
        raise ConfigError("the cuda kernel policy needs MLX's CUDA backend on an NVIDIA GPU "
                          "(pip install 'mlx-sdxs[cuda]'); here MLX computes on "
                          f"{mx.default_device().type.name}: use auto, portable or cpu")
    return policy


def ops_for(policy: str) -> PortableOps:
    """The implementation set of a resolved policy; `cpu` prefers the native kernels when they load."""
    if policy == "portable":
        return PORTABLE
    if policy == "cuda":
        return _CUDA_OPS
    from mlx_sdxs import native

    return native.cpu_ops(_CPU_OPS) if not on_gpu() else _CPU_OPS


def apply_kernels(model: nn.Module, dtype: mx.Dtype, policy: str | None = None) -> str:
    """Give `model` the ops of the policy resolved for `dtype` (and, on the CPU, the buffer cache they were
    measured with); returns the ops' name."""
    resolved = resolve_kernels(dtype, policy)
    ops = ops_for(resolved)
    set_ops(model, ops)
    reserve_cpu_buffer_cache()
    return ops.name


def describe(dtype: mx.Dtype | None = None) -> dict[str, str]:
    """Device, dtype and kernel policy as `info`, timing outputs and the bench report them."""
    dtype = dtype or default_dtype()
    info = mx.device_info()
    device = mx.default_device()
    return {"device": f"{device.type.name} ({info.get('device_name', 'unknown')})", "dtype": dtype_name(dtype),
            "kernels": ops_for(resolve_kernels(dtype)).name, "kernels_requested": requested_kernels()}


# MLX's CPU allocator keeps 32 MiB of freed buffers by default. Above that every large intermediate (a
# 512² × 64-channel TAESD activation is 64 MiB) is a fresh mmap, and its page faults cost as much as the
# convolution that fills it: TAESD decode at 512² measured 3.1 s with the default, 1.2 s with this; a
# 4096-token attention 1.64 s → 0.90 s. Raised for every model loaded on the CPU, however it is loaded.
_CPU_BUFFER_CACHE_BYTES = 4 << 30


def reserve_cpu_buffer_cache() -> None:
    """Let MLX's CPU allocator reuse freed buffers (up to 4 GiB, at most a quarter of the RAM).
    Only raises the limit, and only when computing on the CPU."""
    if on_gpu():
        return
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = min(_CPU_BUFFER_CACHE_BYTES, ram // 4)
    previous = mx.set_cache_limit(limit)
    if previous > limit:
        mx.set_cache_limit(previous)


class StreamOwnershipError(SDXSError):
    """MLX work was started on a thread that does not own the stream it belongs to."""


class OwnedStream:
    """An MLX stream that belongs to one thread. MLX graphs are bound to the stream (and so the thread)
    that built them; `check` turns a use from another thread into a clear error instead of MLX's
    "There is no Stream(…) in current thread"."""

    def __init__(self, device: mx.Device | None = None):
        self.device = device or mx.default_device()
        self.thread = threading.current_thread()
        self.stream = mx.new_stream(self.device)
        #: Set when the owning thread let go of the stream; its arrays are then all evaluated.
        self.released = False

    def check(self, what: str) -> None:
        current = threading.current_thread()
        if current is not self.thread:
            raise StreamOwnershipError(f"{what} ran on thread {current.name!r}, but its MLX stream belongs to "
                                       f"thread {self.thread.name!r}: MLX work must stay on the thread that owns it")


@contextmanager
def thread_stream(device: mx.Device | None = None) -> Iterator[OwnedStream]:
    """Run the body on a new MLX stream owned by this thread (see `OwnedStream`)."""
    owned = OwnedStream(device)
    outer, _thread.owned = getattr(_thread, "owned", None), owned
    try:
        with mx.stream(owned.stream):
            yield owned
    finally:
        _thread.owned = outer
        mx.synchronize(owned.stream)
        owned.released = True


def current_stream() -> OwnedStream | None:
    """The stream the calling thread owns through `thread_stream`, if any."""
    return getattr(_thread, "owned", None)


def end_worker_thread() -> None:
    """Release a worker thread's MLX state (its streams and `mx.compile` cache) while Python still runs.

    Call it last in every thread that ran MLX work. Left to the thread's C++ `thread_local`
    destructors, the compile cache releases Python objects after `Thread.join` has returned; when the
    process is already exiting by then, CPython ends the thread inside the destructor and the process
    aborts ("terminate called without an active exception"). Emptied here, the exit is harmless on
    every OS, with nothing to wait for. The thread can run no MLX work afterwards; on the main thread
    (whose state MLX releases at exit itself) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        mx.clear_streams()


@contextmanager
def worker_thread() -> Iterator[OwnedStream]:
    """The whole MLX life of a worker thread: its own stream (`thread_stream`), then `end_worker_thread`."""
    try:
        with thread_stream() as owned:
            yield owned
    finally:
        end_worker_thread()

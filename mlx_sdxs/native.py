"""The optional native CPU kernels: an MLX C++ extension (`mlx_sdxs/_native`: oneDNN convolutions and linear
layers, and hand-written LayerNorm, GroupNorm, GEGLU and attention kernels), built by `scripts/setup.sh` when
a C++ compiler and CMake are present (or `python -m mlx_sdxs._native.build`).

The `cpu` kernel policy uses them when the extension imports and was built for the running MLX (a C++
extension built against other MLX headers could crash, so the version is checked before the import);
otherwise it keeps the pure-MLX rewrites of `models.cpu_ops`, and `status()` says why.
`MLX_SDXS_NATIVE=off` turns them off (to compare, or to rule them out).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from types import ModuleType
from typing import Callable

import mlx.core as mx

from mlx_sdxs._native.build import BUILD_INFO
from mlx_sdxs.models.cpu_ops import CPUOps
from mlx_sdxs.models.ops import derived

NATIVE_ENV = "MLX_SDXS_NATIVE"
BUILD_HINT = "bash scripts/setup.sh, or .venv/bin/python -m mlx_sdxs._native.build"
_ACTIVATIONS = {None: 0, "relu": 1, "silu": 2}
# GNU OpenMP's idle threads spin 300000 rounds after each parallel region by default, which on a small
# machine steals the cores from the OpenBLAS GEMMs (MLX's matmuls) that run between our kernels:
# on 2 cores the UNet measured 653 ms at 256² and 1852 ms at 512² that way, 432–459 and 1493–1551 ms with
# 10000 rounds (back-to-back TAESD convolutions lose ~5–10 % against spinning forever). libgomp reads the
# variable once, when it loads with the extension; it is only set around that import, so other OpenMP
# runtimes in the process (torch bundles its own) never see it.
_OMP_SPIN = ("GOMP_SPINCOUNT", "10000")


class NativeOps(CPUOps):
    """`CPUOps` with the native kernels where they apply: every float32 NHWC convolution and linear layer (its
    bias, residual and activation fused), LayerNorm, GroupNorm(+SiLU), GEGLU and non-causal attention. Anything
    else — other dtypes, shapes the kernels do not take, a causal mask — goes to the pure-MLX set, unchanged."""

    name = "cpu-native"

    def __init__(self, ext: ModuleType):
        self.ext = ext

    def conv2d(self, conv, x: mx.array, residual: mx.array | None = None, activation: str | None = None) -> mx.array:
        weight = conv.weight
        bias = conv.bias if "bias" in conv else None
        if not (x.ndim == 4 and weight.ndim == 4 and x.shape[-1] == weight.shape[-1]
                and _all_float32(x, weight, bias, residual) and activation in _ACTIVATIONS
                and (residual is None or residual.shape == _conv_output_shape(x, weight, conv))):
            return super().conv2d(conv, x, residual, activation)
        call = (tuple(conv.stride), tuple(conv.padding), _ACTIVATIONS[activation], bias is not None,
                residual is not None)
        packed = self._packed_weight(conv, "conv", lambda: weight, weight.shape, x.shape, call)
        return self.ext.conv2d(x, packed, weight.shape, bias, residual, *call[:3])

    def upsample_conv2d(self, conv, x: mx.array, size: tuple[int, int]) -> mx.array:
        """A 3×3 convolution of the nearest-2× upsampled `x` as one 2×2 convolution of `x` with a block of
        outputs per output phase (2.25× fewer multiply-adds, no upsampled image), then one interleaving pass.
        Other factors, kernels or dtypes: upsample, then `conv2d`."""
        weight = conv.weight
        bias = conv.bias if "bias" in conv else None
        if not (x.ndim == 4 and tuple(size) == (2 * x.shape[1], 2 * x.shape[2]) and weight.shape[1:3] == (3, 3)
                and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (1, 1) and x.shape[-1] == weight.shape[-1]
                and _all_float32(x, weight, bias)):
            return super().upsample_conv2d(conv, x, size)
        phase_shape = (4 * weight.shape[0], 2, 2, weight.shape[-1])
        call = ((1, 1), (1, 1), 0, bias is not None, False)
        packed = self._packed_weight(conv, "phases", lambda: phase_weight(weight), phase_shape, x.shape, call)
        phase_bias = None if bias is None else derived(conv, ("phase bias",), lambda: mx.tile(bias, 4))
        phases = self.ext.conv2d(x, packed, phase_shape, phase_bias, None, *call[:3])
        return self.ext.phase_interleave(phases)

    def linear(self, layer, x: mx.array, residual: mx.array | None = None) -> mx.array:
        """x·Wᵀ + b (+ residual) of an `nn.Linear`-shaped layer as a 1×1 oneDNN convolution over the tokens,
        its weight packed once like a convolution's and the residual add fused; other inputs: the built-in."""
        weight = layer.weight
        bias = layer.bias if "bias" in layer else None
        out_c, in_c = weight.shape if weight.ndim == 2 else (0, 0)
        if not (x.ndim >= 2 and x.size and in_c and x.shape[-1] == in_c and _all_float32(x, weight, bias, residual)
                and (residual is None or residual.shape == (*x.shape[:-1], out_c))):
            return super().linear(layer, x, residual)
        tokens = x.reshape(1, 1, -1, in_c)
        call = ((1, 1), (0, 0), 0, bias is not None, residual is not None)
        shape = (out_c, 1, 1, in_c)
        packed = self._packed_weight(layer, "linear", lambda: weight.reshape(shape), shape, tokens.shape, call)
        skip = None if residual is None else residual.reshape(1, 1, -1, out_c)
        y = self.ext.conv2d(tokens, packed, shape, bias, skip, *call[:3])
        return y.reshape(*x.shape[:-1], out_c)

    def _packed_weight(self, layer, kind: str, weight: Callable[[], mx.array], weight_shape: tuple[int, ...],
                       x_shape: tuple[int, ...], call: tuple) -> mx.array:
        """`weight()` (the `kind` of OHWI weight made from the layer's) in the blocked format oneDNN picked for
        this call, made and packed once per kind and format."""
        key = (kind, self.ext.conv_weight_format(x_shape, weight_shape, *call))
        return derived(layer, key, lambda: self.ext.pack_conv_weight(weight(), x_shape, *call))

    def group_norm(self, norm, x: mx.array, with_silu: bool = False) -> mx.array:
        channels = x.shape[-1]
        if not (x.ndim >= 2 and channels % norm.num_groups == 0 and norm.weight.shape == (channels,)
                and _all_float32(x, norm.weight, norm.bias)):
            return super().group_norm(norm, x, with_silu)
        return self.ext.group_norm(x, norm.weight, norm.bias, norm.num_groups, norm.eps, with_silu)

    def layer_norm(self, norm, x: mx.array) -> mx.array:
        if not ("weight" in norm and "bias" in norm and x.ndim >= 1 and x.size
                and norm.weight.shape == (x.shape[-1],) and _all_float32(x, norm.weight, norm.bias)):
            return super().layer_norm(norm, x)
        return self.ext.layer_norm(x, norm.weight, norm.bias, norm.eps)

    def geglu(self, value: mx.array, gate: mx.array) -> mx.array:
        if value.shape != gate.shape or not _all_float32(value, gate):
            return super().geglu(value, gate)
        return self.ext.geglu(value, gate)

    def attention(self, q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool = False) -> mx.array:
        if causal or not (q.ndim == k.ndim == v.ndim == 4 and k.shape == v.shape and q.shape[:2] == k.shape[:2]
                          and q.shape[3] == k.shape[3] and _all_float32(q, k, v)):
            return super().attention(q, k, v, scale, causal)
        return self.ext.attention(q, k, v, scale)


def phase_weight(weight: mx.array) -> mx.array:
    """The (4·O, 2, 2, I) weight of the 2×2 convolution (padding 1) that computes a 3×3 convolution (padding 1)
    of a nearest-2× upsampled image from the small one: block 2a+b holds output phase (a, b). Along each axis
    phase 0 sees the small image at offsets (-1, 0) with taps (k0, k1+k2), phase 1 at (0, +1) with (k0+k1, k2)."""
    def fold(w: mx.array, axis: int, phase: int) -> mx.array:
        k = [mx.take(w, mx.array([i]), axis=axis) for i in range(3)]
        return mx.concatenate([k[0], k[1] + k[2]] if phase == 0 else [k[0] + k[1], k[2]], axis=axis)
    return mx.concatenate([fold(fold(weight, 1, a), 2, b) for a in (0, 1) for b in (0, 1)], axis=0)


def _all_float32(*arrays: mx.array | None) -> bool:
    return all(a is None or a.dtype == mx.float32 for a in arrays)


def _conv_output_shape(x: mx.array, weight: mx.array, conv) -> tuple[int, ...]:
    (sh, sw), (ph, pw) = conv.stride, conv.padding
    return (x.shape[0], (x.shape[1] + 2 * ph - weight.shape[1]) // sh + 1,
            (x.shape[2] + 2 * pw - weight.shape[2]) // sw + 1, weight.shape[0])


def load() -> tuple[ModuleType | None, str]:
    """(the extension module or None, the status line's reason). Checks the recorded build first: a module
    built for another MLX is never imported."""
    if os.environ.get(NATIVE_ENV, "").lower() in ("0", "off", "false", "no"):
        return None, f"off ({NATIVE_ENV}={os.environ[NATIVE_ENV]})"
    try:
        info = json.loads(BUILD_INFO.read_text())
    except FileNotFoundError:
        return None, f"not built (build them with {BUILD_HINT})"
    except (OSError, ValueError) as exc:
        return None, f"not built ({BUILD_INFO.name} unreadable: {exc}; rebuild with {BUILD_HINT})"
    built_for = info.get("mlx")
    if built_for != mx.__version__:
        return None, f"not built for mlx {mx.__version__} (built for mlx {built_for}; rebuild with {BUILD_HINT})"
    try:
        ext = _import_extension()
    except ImportError as exc:
        return None, f"not built (the module does not import: {exc}; rebuild with {BUILD_HINT})"
    if ext.mlx_version() != mx.__version__ or ext.built_for_mlx != built_for:
        return None, (f"not built for mlx {mx.__version__} "
                      f"(the module says mlx {ext.built_for_mlx}, libmlx {ext.mlx_version()})")
    if not ext.cpu_supported():
        return None, "not usable on this CPU (the build needs AVX2 and FMA)"
    return ext, f"built for mlx {built_for} (oneDNN {ext.onednn_version()}, {ext.threads()} threads)"


def _import_extension() -> ModuleType:
    """Import the module, with `_OMP_SPIN` in the environment unless the user set an OpenMP wait policy."""
    variable, value = _OMP_SPIN
    set_here = variable not in os.environ and "OMP_WAIT_POLICY" not in os.environ
    if set_here:
        os.environ[variable] = value
    try:
        return importlib.import_module("mlx_sdxs._native._ext")
    finally:
        if set_here:
            del os.environ[variable]


_loaded: tuple[ModuleType | None, str] | None = None
_ops: NativeOps | None = None


def _state() -> tuple[ModuleType | None, str]:
    global _loaded
    if _loaded is None:
        _loaded = load()
        ext, reason = _loaded
        if ext is None and BUILD_INFO.exists() and not reason.startswith("off"):
            # Built once but unusable now (MLX upgraded, import error): say so once, then carry on.
            print(f"mlx-sdxs: native CPU kernels {reason}; using the pure-MLX CPU kernels", file=sys.stderr)
    return _loaded


def cpu_ops(fallback: CPUOps) -> CPUOps:
    """The native kernel set when the extension loads, else `fallback`."""
    global _ops
    ext, _ = _state()
    if ext is None:
        return fallback
    if _ops is None:
        _ops = NativeOps(ext)
    return _ops


def status() -> str:
    """One line for `mlx-sdxs info`: `built for mlx X.Y.Z (…)`, `not built (reason)`, `not built for mlx X.Y.Z
    (…)` or `off (…)`."""
    return _state()[1]

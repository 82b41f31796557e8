"""Conv2d, GroupNorm and SiLU that are fast on MLX's CPU backend, drop-in for the `mlx.nn` ones.

On the Linux CPU backend `mx.conv2d` materialises a full im2col buffer with a single-threaded
copy (9× the input for a 3×3 kernel) before its one GEMM, and `mx.exp`/`mx.sigmoid` run as
scalar code (~15 ns an element). These layers keep the `nn.Conv2d`/`nn.GroupNorm` parameters
(`weight` (O, kh, kw, I), `bias` (O,)), so checkpoints load unchanged, and on CPU compute:

- 3×3 stride 1, wide layers (both channel counts ≥ 128): Winograd F(4×4, 3×3) / F(2×2, 3×3),
  i.e. 36 (16) batched GEMMs on transformed tiles, 4× (2.25×) fewer multiplies;
- other k×k convolutions: one GEMM per kernel tap on a *contiguous* slice of the flattened
  padded image (its rows are the image rows extended by the padding columns, which are cropped
  afterwards), accumulated inside BLAS with `addmm`: no im2col copy at all. Stride 2 first
  splits the image into its 4 polyphase components, so every tap is again a contiguous slice;
- 1×1 stride 1: a plain matmul.

On the GPU (and for what the fast paths do not cover: dilation, groups, tiny channel counts)
they call `mx.conv2d`. Measured on a 2-core AVX-512 EPYC: TAESD's 64-channel convs 2–2.5×, the
SDXS UNet's convs 1.4–2.6× faster than `mx.conv2d`.

The elementwise side gets the same treatment: SiLU (alone and fused after GroupNorm's scale and
shift) and attention's softmax use a polynomial `exp` inside `mx.compile`d functions, one pass each;
`reserve_cpu_buffer_cache` lets MLX reuse large buffers instead of page-faulting fresh ones.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx
import mlx.nn as nn

# Below this many input channels a tap GEMM is too thin for BLAS; im2col's copy is then small.
_MIN_TAP_CHANNELS = 16
# Winograd pays for its transforms only when both GEMM sides are wide.
_MIN_WINOGRAD_CHANNELS = 128
# Rows of output per chunk of tap GEMMs: 512K values (2 MiB) keeps the accumulator in L2; measured best.
_CHUNK_OUTPUT_VALUES = 1 << 19

# Winograd F(m×m, 3×3) matrices (Lavin & Gray 2015), as exact rationals in float form.
_WINOGRAD = {
    2: {
        "BT": ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        "G": ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
        "AT": ((1, 1, 1, 0), (0, 1, -1, -1)),
    },
    4: {
        "BT": (
            (4, 0, -5, 0, 1, 0),
            (0, -4, -4, 1, 1, 0),
            (0, 4, -4, -1, 1, 0),
            (0, -2, -1, 2, 1, 0),
            (0, 2, -1, -2, 1, 0),
            (0, 4, 0, -5, 0, 1),
        ),
        "G": (
            (1 / 4, 0, 0),
            (-1 / 6, -1 / 6, -1 / 6),
            (-1 / 6, 1 / 6, -1 / 6),
            (1 / 24, 1 / 12, 1 / 6),
            (1 / 24, -1 / 12, 1 / 6),
            (0, 0, 1),
        ),
        "AT": ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
    },
}


def on_cpu() -> bool:
    """True when new arrays are computed on the CPU (the only place the rewrites pay off)."""
    return mx.default_device().type == mx.DeviceType.cpu


# MLX's CPU allocator keeps 32 MiB of freed buffers by default. Above that every large intermediate (a
# 512² × 64-channel TAESD activation is 64 MiB) is a fresh mmap, and its page faults cost as much as the
# convolution that fills it: TAESD decode at 512² measured 3.1 s with the default, 1.2 s with this.
_CPU_BUFFER_CACHE_BYTES = 4 << 30


def reserve_cpu_buffer_cache() -> None:
    """Let MLX's CPU allocator reuse freed buffers (up to 4 GiB, at most a quarter of the RAM).
    Only raises the limit, and only when computing on the CPU."""
    if not on_cpu():
        return
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = min(_CPU_BUFFER_CACHE_BYTES, ram // 4)
    previous = mx.set_cache_limit(limit)
    if previous > limit:
        mx.set_cache_limit(previous)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _linear_combinations(matrix, arrays: list[mx.array]) -> list[mx.array]:
    """[Σ_k matrix[i][k]·arrays[k] for each row i], skipping zero terms and unit multiplies."""
    out = []
    for row in matrix:
        total = None
        for coeff, array in zip(row, arrays):
            if coeff == 0:
                continue
            if total is None:
                total = array if coeff == 1 else array * coeff
            elif coeff == 1:
                total = total + array
            elif coeff == -1:
                total = total - array
            else:
                total = total + array * coeff
        out.append(total)
    return out


def winograd_weight(weight: mx.array, tile: int) -> mx.array:
    """G·g·Gᵀ for every (out, in) pair of a (O, 3, 3, I) weight → (a², I, O), a = tile + 2."""
    g = mx.array(_WINOGRAD[tile]["G"], dtype=mx.float32)
    w = weight.astype(mx.float32).transpose(1, 2, 3, 0)  # (3, 3, I, O)
    u = mx.tensordot(g, w, axes=([1], [0]))  # (a, 3, I, O): rows transformed
    u = mx.tensordot(g, u, axes=([1], [1])).transpose(1, 0, 2, 3)  # (a, a, I, O)
    return u.reshape(-1, *u.shape[2:])


def winograd_conv3x3(x: mx.array, transformed: mx.array, tile: int, padding: tuple[int, int]) -> mx.array:
    """Stride-1 3×3 convolution of NHWC `x` with a `winograd_weight(…, tile)`; returns (B, H', W', O)."""
    matrices = _WINOGRAD[tile]
    size = tile + 2
    b, h, w, _ = x.shape
    out_h, out_w = h + 2 * padding[0] - 2, w + 2 * padding[1] - 2
    tiles_h, tiles_w = -(-out_h // tile), -(-out_w // tile)
    # Pad so that every tile (stride `tile`, width `tile + 2`) lies inside the padded image.
    x = mx.pad(x, [(0, 0), (padding[0], tile * tiles_h + 2 - h - padding[0]),
                   (padding[1], tile * tiles_w + 2 - w - padding[1]), (0, 0)])
    # Input transform Bᵀ·d·B, first along rows then along columns, on strided views of the image.
    rows = _linear_combinations(matrices["BT"], [x[:, i: i + tile * tiles_h: tile] for i in range(size)])
    points = []
    for row in rows:
        points.extend(_linear_combinations(matrices["BT"], [row[:, :, j: j + tile * tiles_w: tile] for j in range(size)]))
    v = mx.stack(points).reshape(size * size, b * tiles_h * tiles_w, -1)
    m = v @ transformed  # (a², tiles, O): one GEMM per transform point
    out_channels = m.shape[-1]
    m = m.reshape(size, size, b, tiles_h, tiles_w, out_channels)
    # Output transform Aᵀ·m·A, then interleave the tile×tile outputs back into the image.
    partial = _linear_combinations(matrices["AT"], [m[i] for i in range(size)])
    y = [_linear_combinations(matrices["AT"], [p[j] for j in range(size)]) for p in partial]
    y = mx.stack([mx.stack(row, axis=3) for row in y], axis=2)  # (B, th, tile, tw, tile, O)
    y = y.reshape(b, tiles_h * tile, tiles_w * tile, out_channels)
    return y[:, :out_h, :out_w]


def tap_gemm_conv(x: mx.array, weight: mx.array, stride: int, padding: tuple[int, int],
                  bias: mx.array | None = None) -> mx.array:
    """k×k convolution (stride 1 or 2) of NHWC `x` as one `addmm` per kernel tap on contiguous slices.

    The padded image (per polyphase component for stride 2) is flattened to (rows·width, C); the
    operand of tap (i, j) is then the contiguous run starting at offset i·width + j. Outputs are
    computed on the full padded width and the wrap-around columns are cropped.
    """
    b, h, w, c = x.shape
    out_c, kh, kw, _ = weight.shape
    out_h = (h + 2 * padding[0] - kh) // stride + 1
    out_w = (w + 2 * padding[1] - kw) // stride + 1
    # Each polyphase component needs out + (k−1)//stride rows/cols, plus one spare row for the
    # wrap-around reads of the last taps.
    comp_h = out_h + (kh - 1) // stride + 1
    comp_w = out_w + (kw - 1) // stride
    # Rows/cols past the last tap's reach are dropped (strided convs may not use them all).
    x = x[:, : stride * comp_h - padding[0], : stride * comp_w - padding[1]]
    x = mx.pad(x, [(0, 0), (padding[0], stride * comp_h - x.shape[1] - padding[0]),
                   (padding[1], stride * comp_w - x.shape[2] - padding[1]), (0, 0)])
    if stride == 1:
        phases = {(0, 0): x.reshape(b, -1, c)}
    else:
        phases = {(p, q): mx.contiguous(x[:, p::stride, q::stride]).reshape(b, -1, c)
                  for p in range(min(stride, kh)) for q in range(min(stride, kw))}
    taps = [(phases[i % stride, j % stride], (i // stride) * comp_w + j // stride, weight[:, i, j, :].T)
            for i in range(kh) for j in range(kw)]
    rows_per_chunk = max(1, min(out_h, _CHUNK_OUTPUT_VALUES // (comp_w * out_c)))
    chunks = []
    for n in range(b):
        for top in range(0, out_h, rows_per_chunk):
            length = (min(out_h, top + rows_per_chunk) - top) * comp_w
            acc = bias
            for source, offset, tap_weight in taps:
                start = top * comp_w + offset
                operand = source[n, start: start + length]
                acc = operand @ tap_weight if acc is None else mx.addmm(acc, operand, tap_weight)
            chunks.append(acc)
    y = mx.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    return y.reshape(b, out_h, comp_w, out_c)[:, :, :out_w]


class Conv2d(nn.Module):
    """`nn.Conv2d` (groups = dilation = 1) with the CPU fast paths above; same parameters, same output."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0, bias: bool = True):
        super().__init__()
        kernel_size = _pair(kernel_size)
        scale = math.sqrt(1 / (in_channels * kernel_size[0] * kernel_size[1]))
        self.weight = mx.random.uniform(low=-scale, high=scale, shape=(out_channels, *kernel_size, in_channels))
        if bias:
            self.bias = mx.zeros((out_channels,))
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        # (source weight, transformed weight): recomputed whenever `weight` is replaced, e.g. by
        # `load_weights`, because MLX arrays are immutable and the cache holds the source array.
        self._winograd_cache: tuple[mx.array, mx.array] | None = None

    def _formulation(self, x: mx.array) -> str:
        out_c, kh, kw, in_c = self.weight.shape
        if not on_cpu():
            return "conv2d"
        if (kh, kw) == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0):
            return "matmul"
        if self.stride[0] != self.stride[1] or self.stride[0] > 2 or in_c < _MIN_TAP_CHANNELS:
            return "conv2d"
        if self.stride[0] == 2 and in_c >= _MIN_WINOGRAD_CHANNELS:
            return "conv2d"  # a stride-2 im2col is only 2.25× the input: measured as fast as the taps
        if (kh, kw, *self.stride) == (3, 3, 1, 1) and min(in_c, out_c) >= _MIN_WINOGRAD_CHANNELS:
            return "winograd4" if min(x.shape[1], x.shape[2]) >= 32 else "winograd2"
        return "taps"

    def _winograd_weight(self, tile: int) -> mx.array:
        cached = self._winograd_cache
        if cached is None or cached[0] is not self.weight or cached[1].shape[0] != (tile + 2) ** 2:
            self._winograd_cache = cached = (self.weight, winograd_weight(self.weight, tile))
        return cached[1]

    def __call__(self, x: mx.array) -> mx.array:
        formulation = self._formulation(x)
        bias = self.bias if "bias" in self else None
        if formulation == "conv2d":
            y = mx.conv2d(x, self.weight, self.stride, self.padding)
            return y if bias is None else y + bias
        dtype = x.dtype
        # BLAS runs in fp32; half-precision inputs are upcast and the result cast back.
        x = x.astype(mx.float32)
        weight = self.weight.astype(mx.float32)
        bias = None if bias is None else bias.astype(mx.float32)
        if formulation == "matmul":
            b, h, w, c = x.shape
            flat_weight = weight.reshape(weight.shape[0], c).T
            flat = x.reshape(-1, c)
            y = (flat @ flat_weight if bias is None else mx.addmm(bias, flat, flat_weight)).reshape(b, h, w, -1)
        elif formulation == "taps":
            y = tap_gemm_conv(x, weight, self.stride[0], self.padding, bias)
        else:
            tile = 4 if formulation == "winograd4" else 2
            y = winograd_conv3x3(x, self._winograd_weight(tile), tile, self.padding)
            y = y if bias is None else y + bias
        return y.astype(dtype)


# exp(x) = 2ⁿ·eʳ with n = round(x/ln 2), |r| ≤ ln2/2: a degree-7 Taylor polynomial gives ≤ 1e-7
# relative error, and every step is a vectorised elementwise op (mx.exp is scalar code on CPU).
_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693145751953125, 1.4286068203094173e-06  # ln 2 split so n·ln2 is exact
_EXP_TAYLOR = (1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0)


def _exp_polynomial(x: mx.array) -> mx.array:
    x = mx.clip(x, -87.0, 88.0)  # keeps 2ⁿ a normal float32
    n = mx.floor(x * _LOG2E + 0.5)
    r = x - n * _LN2_HI - n * _LN2_LO
    p = _EXP_TAYLOR[0]
    for coeff in _EXP_TAYLOR[1:]:
        p = p * r + coeff
    return p * ((n.astype(mx.int32) + 127) << 23).view(mx.float32)


@mx.compile
def _silu_fused(x: mx.array) -> mx.array:
    return x / (1 + _exp_polynomial(-x))


@mx.compile
def _scale_shift_silu(x: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    return _silu_fused(x * scale + shift)


def fused_on_cpu(x: mx.array) -> bool:
    """True where the compiled polynomial-exp kernels apply: float32 on the CPU. (`mx.compile` fuses each
    into one pass; it needs a C++ compiler at run time and MLX runs them uncompiled without one.)"""
    return on_cpu() and x.dtype == mx.float32


def silu(x: mx.array) -> mx.array:
    """x·sigmoid(x); on CPU float32 one fused pass with the polynomial exp (≤ 2e-7 relative error),
    ~4× faster than `nn.silu`."""
    return _silu_fused(x) if fused_on_cpu(x) else nn.silu(x)


@mx.compile
def _softmax_numerator(scores: mx.array) -> mx.array:
    return _exp_polynomial(scores - scores.max(-1, keepdims=True))


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q·kᵀ·scale)·v over (B, heads, tokens, head_dim) arrays, without a mask.

    On CPU float32: two BLAS matmuls around one fused exp pass, and the softmax division applied to
    the (tokens, head_dim) result instead of the (tokens, tokens) weights. `mx.fast`'s CPU fallback
    runs a scalar exp: SDXS's 1024-token self-attention (10 heads) takes 75 ms this way, 145 ms there.
    """
    if not fused_on_cpu(q):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    weights = _softmax_numerator((q * scale) @ k.swapaxes(-1, -2))
    return (weights @ v) / weights.sum(-1, keepdims=True)


class GroupNorm(nn.Module):
    """PyTorch-semantics GroupNorm over NHWC (`nn.GroupNorm(..., pytorch_compatible=True)` parameters).

    Statistics come from per-channel sums (a contiguous reduction over pixels) folded into groups,
    and the normalisation is a single per-channel scale and shift; half-precision inputs are
    normalised in float32.
    """

    def __init__(self, num_groups: int, dims: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array, with_silu: bool = False) -> mx.array:
        """Normalise; `with_silu` also applies silu, in the same pass on CPU."""
        dtype = x.dtype
        batch, channels = x.shape[0], x.shape[-1]
        per_group = channels // self.num_groups
        flat = x.astype(mx.float32).reshape(batch, -1, channels)
        count = flat.shape[1] * per_group

        def group_mean(per_channel_sum: mx.array) -> mx.array:  # (B, C) sums → (B, C) group means
            means = per_channel_sum.reshape(batch, self.num_groups, per_group).sum(-1, keepdims=True) / count
            return mx.broadcast_to(means, (batch, self.num_groups, per_group)).reshape(batch, 1, channels)

        mean = group_mean(flat.sum(1))
        # Two passes (mean, then centred squares): E[x²]−E[x]² loses digits when |mean| ≫ std.
        var = group_mean(mx.square(flat - mean).sum(1))
        scale = mx.rsqrt(var + self.eps) * self.weight.astype(mx.float32)
        shift = self.bias.astype(mx.float32) - mean * scale
        if with_silu and fused_on_cpu(flat):
            return _scale_shift_silu(flat, scale, shift).reshape(x.shape).astype(dtype)
        y = (flat * scale + shift).reshape(x.shape).astype(dtype)
        return silu(y) if with_silu else y


# ------------------------------------------------------------------ building blocks shared by the models


class Placeholder(nn.Module):
    """A parameter-less slot in a module list, so list indices match the checkpoint's (diffusers' Dropout,
    activation and upsample entries); applies `fn`, the identity by default."""

    def __init__(self, fn=None):
        super().__init__()
        self._fn = fn

    def __call__(self, x: mx.array) -> mx.array:
        return x if self._fn is None else self._fn(x)


def upsample_nearest(x: mx.array, size: tuple[int, int]) -> mx.array:
    """Nearest-neighbour resize of NHWC `x` to `size` (torch `interpolate(mode="nearest")`); a broadcast,
    not a gather, for whole-number factors."""
    batch, height, width, channels = x.shape
    factor_y, factor_x = size[0] // height, size[1] // width
    if (factor_y * height, factor_x * width) == tuple(size):
        x = mx.broadcast_to(x[:, :, None, :, None, :], (batch, height, factor_y, width, factor_x, channels))
        return x.reshape(batch, size[0], size[1], channels)
    rows = (mx.arange(size[0]) * height) // size[0]
    cols = (mx.arange(size[1]) * width) // size[1]
    return x[:, rows][:, :, cols]


class ResnetBlock2D(nn.Module):
    """diffusers' `ResnetBlock2D`: norm-silu-conv twice with a skip (1×1-projected when channels change);
    the UNet's adds the projected time embedding after the first conv."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float,
                 temb_channels: int | None = None, output_scale: float = 1.0):
        super().__init__()
        self.output_scale = output_scale
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array, temb_act: mx.array | None = None) -> mx.array:
        """`temb_act` is silu(time embedding), computed once per UNet forward for every resnet."""
        h = self.conv1(self.norm1(x, with_silu=True))
        if temb_act is not None:
            h = h + self.time_emb_proj(temb_act)[:, None, None, :]
        h = self.conv2(self.norm2(h, with_silu=True))
        skip = self.conv_shortcut(x) if "conv_shortcut" in self else x
        out = skip + h
        return out if self.output_scale == 1.0 else out / self.output_scale


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv; with `padding=0` diffusers pads right/bottom only (the VAE's variant)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def __call__(self, x: mx.array) -> mx.array:
        if self.padding == 0:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest upsampling (to `size`, default 2×) then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
        return self.conv(upsample_nearest(x, size or (2 * x.shape[1], 2 * x.shape[2])))

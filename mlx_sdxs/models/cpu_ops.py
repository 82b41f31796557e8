"""CPU rewrites of the policy-dependent operations: the `cpu` kernel policy (float32 on the CPU).

On MLX's Linux CPU backend `mx.conv2d` materialises a full im2col buffer with a single-threaded
copy (9× the input for a 3×3 kernel) before its one GEMM, and `mx.exp`/`mx.erf`/`mx.sigmoid` run as
scalar code (~15 ns an element). `CPUOps` keeps `PortableOps`' contract and parameters and computes:

- 3×3 stride 1, wide layers (both channel counts ≥ 128): Winograd F(4×4, 3×3) / F(2×2, 3×3),
  i.e. 36 (16) batched GEMMs on transformed tiles, 4× (2.25×) fewer multiplies;
- other k×k convolutions: one GEMM per kernel tap on a *contiguous* slice of the flattened
  padded image (its rows are the image rows extended by the padding columns, which are cropped
  afterwards), accumulated inside BLAS with `addmm`: no im2col copy at all. Stride 2 first
  splits the image into its 4 polyphase components, so every tap is again a contiguous slice;
- 1×1 stride 1: a plain matmul;
- SiLU (alone and fused after GroupNorm's scale and shift), attention's softmax and GEGLU's GELU
  with polynomial/rational `exp`/`erf` inside `mx.compile`d functions, one pass each.

Each rewrite applies only to the shapes where `bench/kernels.py` measured it faster than the
built-in; everything else, and any non-float32 input, goes to `PortableOps`. Pure MLX: no device
query here either — the policy (`mlx_sdxs.runtime`) only hands this set to float32 CPU models.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from mlx_sdxs.models.ops import PortableOps, derived

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
def _silu(x: mx.array) -> mx.array:
    return x / (1 + _exp_polynomial(-x))


@mx.compile
def _scale_shift(x: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    return x * scale + shift


@mx.compile
def _scale_shift_silu(x: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    return _silu(x * scale + shift)


@mx.compile
def _softmax_numerator(scores: mx.array) -> mx.array:
    return _exp_polynomial(scores - scores.max(-1, keepdims=True))


# Attention rewritten only up to this many scores (batch·heads·queries·keys): 1.2–2.0× faster in every run
# (SDXS's cross-attention, 256-token self-attention); above it results varied with memory pressure.
_MAX_FUSED_SCORES = 1 << 22

# Odd/even rational approximation of erf on [-4, 4] (the Eigen/XLA fast-erf coefficients); max abs
# error 4.2e-7. MLX's CPU erf is scalar code: this, compiled to one fused kernel, is 2-6x faster.
_ERF_NUMERATOR = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
                  -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_DENOMINATOR = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
                    -1.42647390514189e-02)


@partial(mx.compile, shapeless=True)
def _geglu(value: mx.array, gate: mx.array) -> mx.array:
    """value · GELU(gate) through the rational erf, GELU first (see `ops`), in one pass."""
    z = mx.clip(gate * 0.7071067811865476, -4.0, 4.0)
    z2 = z * z
    numerator, denominator = _ERF_NUMERATOR[0], _ERF_DENOMINATOR[0]
    for c in _ERF_NUMERATOR[1:]:
        numerator = numerator * z2 + c
    for c in _ERF_DENOMINATOR[1:]:
        denominator = denominator * z2 + c
    return value * (gate * (0.5 + 0.5 * (z * numerator / denominator)))


class CPUOps(PortableOps):
    """`PortableOps` with the CPU rewrites above, each where it measured faster (float32 only)."""

    name = "cpu"

    def conv_formulation(self, conv, x: mx.array) -> str:
        """Which implementation `conv2d` uses for this layer and input: conv2d, matmul, taps, winograd2/4.

        The thresholds are `bench/kernels.py`'s measurements on SDXS-512-0.9 and TAESD at 256² and 512²
        (bench/results/kernels-*.md): each rewrite is used only where it beat `mx.conv2d` for that shape."""
        out_c, kh, kw, in_c = conv.weight.shape
        side, pixels = min(x.shape[1], x.shape[2]), x.shape[1] * x.shape[2]
        if x.dtype != mx.float32:
            return "conv2d"
        if (kh, kw) == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0):
            return "matmul"  # 1.13–1.66× at every UNet shape
        if conv.stride[0] != conv.stride[1] or conv.stride[0] > 2 or in_c < _MIN_TAP_CHANNELS:
            return "conv2d"
        if conv.stride[0] == 2:
            # The polyphase split costs a copy: taps win from 256² inputs (1.1–1.75×), tie at 128², lose below.
            return "taps" if in_c < _MIN_WINOGRAD_CHANNELS and pixels >= 256 * 256 else "conv2d"
        if (kh, kw) == (3, 3) and min(in_c, out_c) >= _MIN_WINOGRAD_CHANNELS:
            # Winograd's transforms pay on big reductions over enough tiles: ≥ 1280 input channels at 16²
            # (1.15–1.32×), ≥ 640 at 32² and up (1.0–1.76×); 320 channels, or 8² maps, lose (0.62–0.91×).
            if side >= 32 and in_c >= 640:
                return "winograd4"
            if side >= 16 and in_c >= 1280:
                return "winograd2"
            return "conv2d"
        # Tap GEMMs beat im2col from 64² maps (1.2–2.7×) and for thin outputs (the 4-channel latent convs).
        return "taps" if pixels >= 64 * 64 or out_c < _MIN_TAP_CHANNELS else "conv2d"

    def conv2d(self, conv, x: mx.array, residual: mx.array | None = None, activation: str | None = None) -> mx.array:
        formulation = self.conv_formulation(conv, x)
        if formulation == "conv2d":
            return super().conv2d(conv, x, residual, activation)
        bias = conv.bias if "bias" in conv else None
        if formulation == "matmul":
            b, h, w, c = x.shape
            flat_weight = conv.weight.reshape(conv.weight.shape[0], c).T
            flat = x.reshape(-1, c)
            y = (flat @ flat_weight if bias is None else mx.addmm(bias, flat, flat_weight)).reshape(b, h, w, -1)
        elif formulation == "taps":
            y = tap_gemm_conv(x, conv.weight, conv.stride[0], conv.padding, bias)
        else:
            tile = 4 if formulation == "winograd4" else 2
            y = winograd_conv3x3(x, _cached_winograd_weight(conv, tile), tile, conv.padding)
            y = y if bias is None else y + bias
        if residual is not None:
            y = y + residual
        return y if activation is None else (self.silu(y) if activation == "silu" else nn.relu(y))

    def group_norm(self, norm, x: mx.array, with_silu: bool = False) -> mx.array:
        """Statistics from per-channel sums (a contiguous reduction over pixels) folded into groups, two
        passes (E[x²]−E[x]² loses digits when |mean| ≫ std), then one fused scale-shift(-SiLU) pass."""
        if x.dtype != mx.float32:
            return super().group_norm(norm, x, with_silu)
        batch, channels = x.shape[0], x.shape[-1]
        groups = norm.num_groups
        per_group = channels // groups
        flat = x.reshape(batch, -1, channels)
        count = flat.shape[1] * per_group

        def group_mean(per_channel_sum: mx.array) -> mx.array:  # (B, C) sums → (B, 1, C) group means
            means = per_channel_sum.reshape(batch, groups, per_group).sum(-1, keepdims=True) / count
            return mx.broadcast_to(means, (batch, groups, per_group)).reshape(batch, 1, channels)

        mean = group_mean(flat.sum(1))
        var = group_mean(mx.square(flat - mean).sum(1))
        scale = mx.rsqrt(var + norm.eps) * norm.weight
        shift = norm.bias - mean * scale
        return (_scale_shift_silu if with_silu else _scale_shift)(flat, scale, shift).reshape(x.shape)

    def silu(self, x: mx.array) -> mx.array:
        """x·sigmoid(x) in one fused pass with the polynomial exp (≤ 2e-7 relative error)."""
        return _silu(x) if x.dtype == mx.float32 else super().silu(x)

    def geglu(self, value: mx.array, gate: mx.array) -> mx.array:
        return _geglu(value, gate) if gate.dtype == mx.float32 else super().geglu(value, gate)

    def attention(self, q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool = False) -> mx.array:
        """Two BLAS matmuls around one fused exp pass; the softmax division is applied to the
        (tokens, head_dim) result instead of the (tokens, tokens) weights. Only up to `_MAX_FUSED_SCORES`
        scores: beyond, the materialised exp pass measured 0.6–1.4× `mx.fast` (SD-Turbo's 4096-token
        self-attention: 2.1 s vs 1.2 s in one run, 0.9 s vs 1.3 s in another) — not a reliable win."""
        scores = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
        if causal or q.dtype != mx.float32 or scores > _MAX_FUSED_SCORES:
            return super().attention(q, k, v, scale, causal)
        weights = _softmax_numerator((q * scale) @ k.swapaxes(-1, -2))
        return (weights @ v) / weights.sum(-1, keepdims=True)


def _cached_winograd_weight(conv, tile: int) -> mx.array:
    """G·g·Gᵀ of the layer's weight, kept on the layer until its weight is replaced (see `ops.derived`)."""
    return derived(conv, ("winograd", tile), lambda: winograd_weight(conv.weight, tile))

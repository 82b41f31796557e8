// The native CPU kernels of mlx-sdxs as MLX primitives: inference only (no vjp/jvp/vmap), float32,
// evaluated on MLX's CPU stream thread; `eval_gpu` throws (the Python side only uses them on the CPU).
#pragma once

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>
#include <utility>

#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace sdxs {

namespace mx = mlx::core;

// The fused epilogue after bias and residual: 0 none, 1 ReLU, 2 SiLU (Python passes these numbers).
enum class Activation : int { none = 0, relu = 1, silu = 2 };

// activation(conv2d(x, weight) + bias + residual) on NHWC x (oneDNN), with the OHWI weight packed by
// `pack_conv_weight` for the same input shape and epilogue (or for any with the same `conv_weight_format`).
mx::array conv2d(const mx::array& x, const mx::array& packed, const std::vector<int>& weight_list,
                 const std::optional<mx::array>& bias, const std::optional<mx::array>& residual,
                 std::pair<int, int> stride, std::pair<int, int> padding, int activation, mx::StreamOrDevice s = {});
mx::array pack_conv_weight(const mx::array& weight, const std::vector<int>& x_shape, std::pair<int, int> stride,
                           std::pair<int, int> padding, int activation, bool bias, bool residual,
                           mx::StreamOrDevice s = {});
// The packed-weight format that `conv2d` wants for this call: equal strings, interchangeable packings.
std::string conv_weight_format(const std::vector<int>& x_shape, const std::vector<int>& weight_shape, std::pair<int, int> stride,
                               std::pair<int, int> padding, int activation, bool bias, bool residual);

// PyTorch-semantics GroupNorm over NHWC x (statistics in double), optionally followed by SiLU.
mx::array group_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, int groups,
                     float eps, bool silu, mx::StreamOrDevice s = {});

// LayerNorm over the last axis (float32 statistics, two-pass variance), with weight and bias.
mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, float eps,
                     mx::StreamOrDevice s = {});

// softmax(q·kᵀ·scale)·v over (B, heads, tokens, head_dim); the result's memory is (B, tokens, heads,
// head_dim), so the model's transpose back to tokens-major costs nothing.
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                    mx::StreamOrDevice s = {});

// value · GELU(gate) (exact-erf GELU to 4e-7), value and gate of one shape, e.g. a projection's halves.
mx::array geglu(const mx::array& value, const mx::array& gate, mx::StreamOrDevice s = {});

// The result of a nearest-2× upsample then a 3×3 convolution, from the (N, H+1, W+1, 4·C) output of the
// equivalent 2×2 phase convolution (padding 1): out[n, 2i+a, 2j+b, c] = phases[n, i+a, j+b, (2a+b)·C + c].
mx::array phase_interleave(const mx::array& phases, mx::StreamOrDevice s = {});

// Threads the kernels compute with (OpenMP; oneDNN shares them).
int threads();
void set_threads(int n);
// "major.minor.patch" of the oneDNN library loaded at run time.
std::string onednn_version();
// True when this CPU runs the code this module was compiled for (AVX2 + FMA on x86-64).
bool cpu_supported();

// Base of the primitives: inference-only, CPU-only.
class CPUOnlyPrimitive : public mx::UnaryPrimitive {
 public:
  explicit CPUOnlyPrimitive(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error(std::string(name()) + ": the mlx-sdxs native kernels run on the CPU only");
  }
};

}  // namespace sdxs

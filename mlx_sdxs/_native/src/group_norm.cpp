// GroupNorm(+SiLU) over NHWC: one read pass for per-channel Σx and Σx² (float blocks summed into
// double, so E[x²]−E[x]² keeps its digits even when |mean| ≫ std), folded into per-channel scale and
// shift, then one read-write pass applying them (and SiLU). Hand-written: oneDNN 3.2 has no group norm,
// and MLX's reduction + elementwise graph reads the activation four times.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/ops.h"

#include "aligned.h"
#include "kernels.h"
#include "simd.h"

namespace sdxs {

namespace {

// Pixels summed in float before they are added to the double totals.
constexpr size_t kBlockPixels = 64;

void group_norm_kernel(const float* x, const float* gamma, const float* beta, float* y, int batch, size_t pixels,
                       int channels, int groups, float eps, bool silu) {
  const int per_group = channels / groups;
  const int nthreads = omp_get_max_threads();
  std::vector<double> sums(static_cast<size_t>(nthreads) * 2 * channels);
  std::vector<float> scale(channels), shift(channels);
  for (int b = 0; b < batch; ++b) {
    const float* xb = x + static_cast<size_t>(b) * pixels * channels;
    float* yb = y + static_cast<size_t>(b) * pixels * channels;
    std::fill(sums.begin(), sums.end(), 0.0);
#pragma omp parallel num_threads(nthreads)
    {
      double* s1 = sums.data() + static_cast<size_t>(omp_get_thread_num()) * 2 * channels;
      double* s2 = s1 + channels;
      std::vector<float> f1(channels), f2(channels);
      const size_t blocks = (pixels + kBlockPixels - 1) / kBlockPixels;
#pragma omp for schedule(static)
      for (size_t blk = 0; blk < blocks; ++blk) {
        std::fill(f1.begin(), f1.end(), 0.0f);
        std::fill(f2.begin(), f2.end(), 0.0f);
        const size_t end = std::min(pixels, (blk + 1) * kBlockPixels);
        for (size_t p = blk * kBlockPixels; p < end; ++p) {
          const float* row = xb + p * channels;
          for (int c = 0; c < channels; ++c) {
            f1[c] += row[c];
            f2[c] += row[c] * row[c];
          }
        }
        for (int c = 0; c < channels; ++c) {
          s1[c] += f1[c];
          s2[c] += f2[c];
        }
      }
    }
    const double count = static_cast<double>(pixels) * per_group;
    for (int g = 0; g < groups; ++g) {
      double s = 0.0, q = 0.0;
      for (int t = 0; t < nthreads; ++t) {
        const double* s1 = sums.data() + static_cast<size_t>(t) * 2 * channels;
        for (int c = g * per_group; c < (g + 1) * per_group; ++c) {
          s += s1[c];
          q += s1[channels + c];
        }
      }
      const double mean = s / count;
      const double var = std::max(q / count - mean * mean, 0.0);
      const double rstd = 1.0 / std::sqrt(var + eps);
      for (int c = g * per_group; c < (g + 1) * per_group; ++c) {
        scale[c] = static_cast<float>(rstd * gamma[c]);
        shift[c] = static_cast<float>(beta[c] - mean * rstd * gamma[c]);
      }
    }
    const size_t chunk = std::max<size_t>(1, (pixels + nthreads - 1) / nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int t = 0; t < nthreads; ++t) {
      const size_t begin = std::min(pixels, t * chunk), end = std::min(pixels, begin + chunk);
      simd::scale_shift_rows(xb + begin * channels, yb + begin * channels, scale.data(), shift.data(), end - begin,
                             channels, silu);
    }
  }
}

class GroupNorm : public CPUOnlyPrimitive {
 public:
  GroupNorm(mx::Stream stream, int groups, float eps, bool silu)
      : CPUOnlyPrimitive(stream), groups_(groups), eps_(eps), silu_(silu) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& x = inputs[0];
    set_data_in_place_or_aligned(x, out);
    auto& encoder = encoder_for(stream(), inputs, out);
    const int batch = x.shape(0), channels = x.shape(-1);
    const size_t pixels = x.size() / (static_cast<size_t>(batch) * channels);
    encoder.dispatch([x_ptr = x.data<float>(), gamma = inputs[1].data<float>(), beta = inputs[2].data<float>(),
                      y = out.data<float>(), batch, pixels, channels, groups = groups_, eps = eps_, silu = silu_]() {
      group_norm_kernel(x_ptr, gamma, beta, y, batch, pixels, channels, groups, eps, silu);
    });
  }

  const char* name() const override { return "SdxsGroupNorm"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const GroupNorm&>(other);
    return groups_ == o.groups_ && eps_ == o.eps_ && silu_ == o.silu_;
  }

 private:
  int groups_;
  float eps_;
  bool silu_;
};

}  // namespace

mx::array group_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, int groups, float eps,
                     bool silu, mx::StreamOrDevice s) {
  if (x.ndim() < 2 || x.dtype() != mx::float32 || weight.dtype() != mx::float32 || bias.dtype() != mx::float32)
    throw std::invalid_argument("sdxs group_norm: float32 (B, ..., C) input and parameters only");
  const int channels = x.shape(-1);
  if (groups < 1 || channels % groups || weight.size() != static_cast<size_t>(channels) ||
      bias.size() != static_cast<size_t>(channels))
    throw std::invalid_argument("sdxs group_norm: groups must divide the channels; weight and bias are (C,)");
  auto stream = mx::to_stream(s);
  return mx::array(x.shape(), mx::float32, std::make_shared<GroupNorm>(stream, groups, eps, silu),
                   {mx::contiguous(x, false, stream), mx::contiguous(mx::flatten(weight, stream), false, stream),
                    mx::contiguous(mx::flatten(bias, stream), false, stream)});
}

}  // namespace sdxs

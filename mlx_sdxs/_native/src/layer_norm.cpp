// LayerNorm over the last axis (the UNet's transformer blocks: 320–1280 channels, 64–4096 tokens), one
// multi-threaded pass over the rows: mean, then the variance around it (two passes over a row that sits
// in L1), then the scale and shift. MLX's CPU layer norm runs on one thread.
#include <omp.h>

#include <cmath>

#include "mlx/allocator.h"
#include "mlx/ops.h"

#include "aligned.h"
#include "kernels.h"
#include "simd.h"

namespace sdxs {

namespace {

void layer_norm_row(const float* x, const float* gamma, const float* beta, float* y, int channels, float eps) {
  int c = 0;
  float sum = 0.0f;
#ifdef SDXS_AVX2
  __m256 vsum = _mm256_setzero_ps();
  for (; c + 8 <= channels; c += 8) vsum = _mm256_add_ps(vsum, _mm256_loadu_ps(x + c));
  sum = simd::lanes_sum(vsum);
#endif
  for (; c < channels; ++c) sum += x[c];
  const float mean = sum / channels;
  float squares = 0.0f;
  c = 0;
#ifdef SDXS_AVX2
  const __m256 vmean = _mm256_set1_ps(mean);
  __m256 vsq = _mm256_setzero_ps();
  for (; c + 8 <= channels; c += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + c), vmean);
    vsq = _mm256_fmadd_ps(d, d, vsq);
  }
  squares = simd::lanes_sum(vsq);
#endif
  for (; c < channels; ++c) squares += (x[c] - mean) * (x[c] - mean);
  const float rstd = 1.0f / std::sqrt(squares / channels + eps);
  c = 0;
#ifdef SDXS_AVX2
  const __m256 vrstd = _mm256_set1_ps(rstd);
  for (; c + 8 <= channels; c += 8) {
    const __m256 normed = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + c), vmean), vrstd);
    _mm256_storeu_ps(y + c, _mm256_fmadd_ps(normed, _mm256_loadu_ps(gamma + c), _mm256_loadu_ps(beta + c)));
  }
#endif
  for (; c < channels; ++c) y[c] = (x[c] - mean) * rstd * gamma[c] + beta[c];
}

class LayerNorm : public CPUOnlyPrimitive {
 public:
  LayerNorm(mx::Stream stream, float eps) : CPUOnlyPrimitive(stream), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& x = inputs[0];
    set_data_in_place_or_aligned(x, out);
    auto& encoder = encoder_for(stream(), inputs, out);
    const int channels = x.shape(-1);
    const int64_t rows = static_cast<int64_t>(x.size() / channels);
    encoder.dispatch([x_ptr = x.data<float>(), gamma = inputs[1].data<float>(), beta = inputs[2].data<float>(),
                      y = out.data<float>(), rows, channels, eps = eps_]() {
#pragma omp parallel for schedule(static) if (rows * channels >= 16384)
      for (int64_t r = 0; r < rows; ++r)
        layer_norm_row(x_ptr + r * channels, gamma, beta, y + r * channels, channels, eps);
    });
  }

  const char* name() const override { return "SdxsLayerNorm"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const LayerNorm&>(other).eps_;
  }

 private:
  float eps_;
};

}  // namespace

mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, float eps,
                     mx::StreamOrDevice s) {
  if (x.ndim() < 1 || x.dtype() != mx::float32 || weight.dtype() != mx::float32 || bias.dtype() != mx::float32)
    throw std::invalid_argument("sdxs layer_norm: float32 input and parameters only");
  const auto channels = static_cast<size_t>(x.shape(-1));
  if (channels == 0 || weight.size() != channels || bias.size() != channels)
    throw std::invalid_argument("sdxs layer_norm: weight and bias must be (C,), C the last axis");
  auto stream = mx::to_stream(s);
  return mx::array(x.shape(), mx::float32, std::make_shared<LayerNorm>(stream, eps),
                   {mx::contiguous(x, false, stream), mx::contiguous(mx::flatten(weight, stream), false, stream),
                    mx::contiguous(mx::flatten(bias, stream), false, stream)});
}

}  // namespace sdxs

// The interleave step of a nearest-2× upsample fused with the 3×3 convolution after it. That pair equals one
// 2×2 convolution of the small image (padding 1) with 4·C outputs, one block of C per output phase (a, b):
// out[2i+a, 2j+b] = phases[i+a, j+b, (2a+b)·C …]. The 2×2 convolution does 16 instead of 36 multiply-adds
// per input pixel and channel pair and never materialises the upsampled image; this kernel writes the
// result in one pass, C floats at a time.
#include <omp.h>

#include <cstring>

#include "mlx/allocator.h"
#include "mlx/ops.h"

#include "aligned.h"
#include "kernels.h"

namespace sdxs {

namespace {

class PhaseInterleave : public CPUOnlyPrimitive {
 public:
  explicit PhaseInterleave(mx::Stream stream) : CPUOnlyPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& phases = inputs[0];
    set_aligned_data(out);
    auto& encoder = encoder_for(stream(), inputs, out);
    const int64_t batch = out.shape(0), height = out.shape(1) / 2, width = out.shape(2) / 2, channels = out.shape(3);
    encoder.dispatch([src = phases.data<float>(), dst = out.data<float>(), batch, height, width, channels]() {
      const int64_t in_row = (width + 1) * 4 * channels, out_row = 2 * width * channels;
#pragma omp parallel for schedule(static) collapse(2)
      for (int64_t n = 0; n < batch; ++n) {
        for (int64_t r = 0; r < 2 * height; ++r) {
          const int64_t a = r & 1;
          const float* row = src + (n * (height + 1) + r / 2 + a) * in_row;
          float* y = dst + (n * 2 * height + r) * out_row;
          for (int64_t j = 0; j < width; ++j) {
            for (int64_t b = 0; b < 2; ++b) {
              std::memcpy(y, row + ((j + b) * 4 + 2 * a + b) * channels, channels * sizeof(float));
              y += channels;
            }
          }
        }
      }
    });
  }

  const char* name() const override { return "SdxsPhaseInterleave"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

}  // namespace

mx::array phase_interleave(const mx::array& phases, mx::StreamOrDevice s) {
  if (phases.ndim() != 4 || phases.dtype() != mx::float32 || phases.shape(1) < 2 || phases.shape(2) < 2 ||
      phases.shape(3) % 4 != 0)
    throw std::invalid_argument("sdxs phase_interleave: float32 (N, H+1, W+1, 4·C) phases only");
  const auto stream = mx::to_stream(s);
  const mx::Shape shape{phases.shape(0), 2 * (phases.shape(1) - 1), 2 * (phases.shape(2) - 1), phases.shape(3) / 4};
  return mx::array(shape, mx::float32, std::make_shared<PhaseInterleave>(stream), {mx::contiguous(phases, false, stream)});
}

}  // namespace sdxs

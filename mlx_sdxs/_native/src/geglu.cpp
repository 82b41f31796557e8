// GEGLU: value · GELU(gate) with GELU = gate·Φ(gate), Φ through a rational erf (the coefficients of
// `models.cpu_ops`, max abs error 4.2e-7), in one multi-threaded pass. value and gate are the two halves
// of the projection's output (strided views): read in place, no split copies. MLX's compiled version of
// the same arithmetic runs on one thread at ~7 ns an element.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/ops.h"

#include "aligned.h"
#include "kernels.h"
#include "simd.h"

namespace sdxs {

namespace {

constexpr float kErfNum[] = {-2.72614225801306e-10f, 2.77068142495902e-08f, -2.10102402082508e-06f,
                             -5.69250639462346e-05f, -7.34990630326855e-04f, -2.95459980854025e-03f,
                             -1.60960333262415e-02f};
constexpr float kErfDen[] = {-1.45660718464996e-05f, -2.13374055278905e-04f, -1.68282697438203e-03f,
                             -7.37332916720468e-03f, -1.42647390514189e-02f};
constexpr float kSqrtHalf = 0.7071067811865476f;

inline float geglu_scalar(float value, float gate) {
  const float z = std::clamp(gate * kSqrtHalf, -4.0f, 4.0f), z2 = z * z;
  float num = kErfNum[0], den = kErfDen[0];
  for (int i = 1; i < 7; ++i) num = num * z2 + kErfNum[i];
  for (int i = 1; i < 5; ++i) den = den * z2 + kErfDen[i];
  return value * (gate * (0.5f + 0.5f * (z * num / den)));
}

#ifdef SDXS_AVX2
inline __m256 geglu8(__m256 value, __m256 gate) {
  __m256 z = _mm256_mul_ps(gate, _mm256_set1_ps(kSqrtHalf));
  z = _mm256_min_ps(_mm256_max_ps(z, _mm256_set1_ps(-4.0f)), _mm256_set1_ps(4.0f));
  const __m256 z2 = _mm256_mul_ps(z, z);
  __m256 num = _mm256_set1_ps(kErfNum[0]), den = _mm256_set1_ps(kErfDen[0]);
  for (int i = 1; i < 7; ++i) num = _mm256_fmadd_ps(num, z2, _mm256_set1_ps(kErfNum[i]));
  for (int i = 1; i < 5; ++i) den = _mm256_fmadd_ps(den, z2, _mm256_set1_ps(kErfDen[i]));
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 phi = _mm256_fmadd_ps(half, _mm256_div_ps(_mm256_mul_ps(z, num), den), half);
  return _mm256_mul_ps(value, _mm256_mul_ps(gate, phi));
}
#endif

struct Rows {  // an operand as `rows` rows of `width` contiguous floats, `stride` apart
  const float* data;
  int64_t stride;
};

// The operand in place when its leading axes fold into rows of one stride, else a row-major copy.
Rows rows_of(const mx::array& a, std::vector<float>& copy) {
  const auto& st = a.strides();
  const int last = a.ndim() - 1;
  bool folds = st[last] == 1;
  for (int i = 0; i + 1 < last && folds; ++i) folds = a.shape(i) == 1 || st[i] == a.shape(i + 1) * st[i + 1];
  if (folds) return {a.data<float>(), last > 0 ? st[last - 1] : a.shape(last)};
  return {row_major_copy(a, copy), a.shape(last)};
}

class Geglu : public CPUOnlyPrimitive {
 public:
  explicit Geglu(mx::Stream stream) : CPUOnlyPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    set_aligned_data(out);
    auto& encoder = encoder_for(stream(), inputs, out);
    const int64_t width = out.shape(-1), rows = static_cast<int64_t>(out.size()) / std::max<int64_t>(width, 1);
    encoder.dispatch([value = mx::array::unsafe_weak_copy(inputs[0]), gate = mx::array::unsafe_weak_copy(inputs[1]),
                      y = out.data<float>(), rows, width]() {
      std::vector<float> value_copy, gate_copy;
      const Rows v = rows_of(value, value_copy), g = rows_of(gate, gate_copy);
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        const float* vr = v.data + r * v.stride;
        const float* gr = g.data + r * g.stride;
        float* yr = y + r * width;
        int64_t c = 0;
#ifdef SDXS_AVX2
        for (; c + 8 <= width; c += 8)
          _mm256_storeu_ps(yr + c, geglu8(_mm256_loadu_ps(vr + c), _mm256_loadu_ps(gr + c)));
#endif
        for (; c < width; ++c) yr[c] = geglu_scalar(vr[c], gr[c]);
      }
    });
  }

  const char* name() const override { return "SdxsGeglu"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

}  // namespace

mx::array geglu(const mx::array& value, const mx::array& gate, mx::StreamOrDevice s) {
  if (value.shape() != gate.shape() || value.ndim() < 1 || value.dtype() != mx::float32 ||
      gate.dtype() != mx::float32)
    throw std::invalid_argument("sdxs geglu: float32 value and gate of one shape only");
  return mx::array(value.shape(), mx::float32, std::make_shared<Geglu>(mx::to_stream(s)), {value, gate});
}

}  // namespace sdxs

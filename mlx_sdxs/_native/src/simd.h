// Vector helpers shared by the hand-written kernels. x86-64 builds use AVX2 + FMA (checked at load
// time by `cpu_supported`); other CPUs get the scalar loop, which the compiler vectorises for them.
#pragma once

#include <cmath>
#include <cstddef>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SDXS_AVX2 1
#endif

namespace sdxs::simd {

// exp(x) = 2ⁿ·eʳ, n = round(x·log₂e), |r| ≤ ln2/2; degree-6 polynomial: ≤ 2 ulp on [-87, 88].
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;  // ln 2 split so that n·ln2 is exact
constexpr float kLn2Lo = 1.42860682030941723e-6f;
constexpr float kExpMin = -87.0f, kExpMax = 88.0f;
constexpr float kExpPoly[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};

inline float exp_scalar(float x) {
  x = std::fmin(std::fmax(x, kExpMin), kExpMax);
  const float n = std::nearbyint(x * kLog2e);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = kExpPoly[0];
  for (int i = 1; i < 7; ++i) p = p * r + kExpPoly[i];
  return std::ldexp(p, static_cast<int>(n));
}

inline float silu_scalar(float x) { return x / (1.0f + exp_scalar(-x)); }

#ifdef SDXS_AVX2
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpMin)), _mm256_set1_ps(kExpMax));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

inline __m256 silu8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

// The sum and the maximum of the eight lanes.
inline float lanes_sum(__m256 v) {
  float lanes[8], sum = 0.0f;
  _mm256_storeu_ps(lanes, v);
  for (float lane : lanes) sum += lane;
  return sum;
}

inline float lanes_max(__m256 v) {
  float lanes[8], max = -INFINITY;
  _mm256_storeu_ps(lanes, v);
  for (float lane : lanes) max = std::fmax(max, lane);
  return max;
}
#endif

// y[i] = x[i]·scale[i % channels] + shift[i % channels] (then SiLU) for `pixels` rows of `channels`.
inline void scale_shift_rows(const float* x, float* y, const float* scale, const float* shift, size_t pixels,
                             size_t channels, bool silu) {
  for (size_t p = 0; p < pixels; ++p) {
    const float* xr = x + p * channels;
    float* yr = y + p * channels;
    size_t c = 0;
#ifdef SDXS_AVX2
    for (; c + 8 <= channels; c += 8) {
      __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(xr + c), _mm256_loadu_ps(scale + c), _mm256_loadu_ps(shift + c));
      _mm256_storeu_ps(yr + c, silu ? silu8(v) : v);
    }
#endif
    for (; c < channels; ++c) {
      const float v = xr[c] * scale[c] + shift[c];
      yr[c] = silu ? silu_scalar(v) : v;
    }
  }
}

// In place: row[i] = exp(row[i] − max) for i < n; returns Σ row[i] (after the exp).
inline float exp_minus_max(float* row, size_t n) {
  float max = -INFINITY;
  size_t i = 0;
#ifdef SDXS_AVX2
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(row + i));
  max = lanes_max(vmax);
#endif
  for (; i < n; ++i) max = std::fmax(max, row[i]);
  float sum = 0.0f;
  i = 0;
#ifdef SDXS_AVX2
  const __m256 vm = _mm256_set1_ps(max);
  __m256 vsum = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + i), vm));
    _mm256_storeu_ps(row + i, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  sum = lanes_sum(vsum);
#endif
  for (; i < n; ++i) {
    row[i] = exp_scalar(row[i] - max);
    sum += row[i];
  }
  return sum;
}

}  // namespace sdxs::simd

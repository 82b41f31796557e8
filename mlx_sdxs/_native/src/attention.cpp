// Attention softmax(q·kᵀ·scale)·v, one block of queries at a time: the block's scores stay in L2
// between the two GEMMs, the exp is a vector polynomial, and the softmax division is applied to the
// (queries, head_dim) result. Blocks are spread over the OpenMP threads; inside them oneDNN's sgemm
// runs sequentially (it does not nest threads). q, k and v may be strided views (MLX's head-split
// transposes) as long as head_dim is contiguous: no copies.
#include <omp.h>

#include <algorithm>
#include <vector>

#include <oneapi/dnnl/dnnl.h>

#include "mlx/allocator.h"
#include "mlx/ops.h"

#include "aligned.h"
#include "kernels.h"
#include "simd.h"

namespace sdxs {

namespace {

// Scores per query block: 256K floats (1 MiB) fit in a core's L2 next to the operands.
constexpr int kBlockScores = 1 << 18;

struct View {  // a (B, H, T, D) operand: element strides of B, H and T (D is contiguous)
  const float* data;
  int64_t b, h, t;
};

// The operand in place when its head_dim rows are contiguous and do not overlap (what MLX's head-split
// transposes give), else a row-major copy into `copy`.
View view_of(const mx::array& a, std::vector<float>& copy) {
  const auto& st = a.strides();
  if (st[3] == 1 && st[2] >= a.shape(3)) return {a.data<float>(), st[0], st[1], st[2]};
  const int64_t dim = a.shape(3), t = a.shape(2), h = a.shape(1);
  return {row_major_copy(a, copy), h * t * dim, t * dim, dim};
}

void attention_kernel(View q, View k, View v, float* out, int batch, int heads, int queries, int keys, int dim,
                      float scale) {
  const int block = std::clamp(kBlockScores / std::max(keys, 1), 8, 128);
  const int blocks_per_head = (queries + block - 1) / block;
  const int64_t items = static_cast<int64_t>(batch) * heads * blocks_per_head;
#pragma omp parallel
  {
    std::vector<float> scores(static_cast<size_t>(block) * keys);
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) {
      const int b = static_cast<int>(item / (heads * blocks_per_head));
      const int h = static_cast<int>(item / blocks_per_head % heads);
      const int q0 = static_cast<int>(item % blocks_per_head) * block;
      const int rows = std::min(block, queries - q0);
      const float* qp = q.data + b * q.b + h * q.h + q0 * q.t;
      const float* kp = k.data + b * k.b + h * k.h;
      const float* vp = v.data + b * v.b + h * v.h;
      // Output memory is (B, T, H, D): row r of this block is at ((b·T + q0 + r)·H + h)·D.
      float* op = out + ((static_cast<int64_t>(b) * queries + q0) * heads + h) * dim;
      const int64_t out_row = static_cast<int64_t>(heads) * dim;
      dnnl_sgemm('N', 'T', rows, keys, dim, scale, qp, q.t, kp, k.t, 0.0f, scores.data(), keys);
      std::vector<float> inverse(rows);
      for (int r = 0; r < rows; ++r) inverse[r] = 1.0f / simd::exp_minus_max(scores.data() + r * keys, keys);
      dnnl_sgemm('N', 'N', rows, dim, keys, 1.0f, scores.data(), keys, vp, v.t, 0.0f, op, out_row);
      for (int r = 0; r < rows; ++r) {
        float* row = op + r * out_row;
        for (int d = 0; d < dim; ++d) row[d] *= inverse[r];
      }
    }
  }
}

class Attention : public CPUOnlyPrimitive {
 public:
  Attention(mx::Stream stream, float scale) : CPUOnlyPrimitive(stream), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto &q = inputs[0], &k = inputs[1], &v = inputs[2];
    const int batch = q.shape(0), heads = q.shape(1), queries = q.shape(2), dim = q.shape(3), keys = k.shape(2);
    // (B, H, T, D) logically, (B, T, H, D) in memory.
    if (heads == 1 || queries == 1) {  // then both layouts are the same
      set_aligned_data(out);
    } else {
      const int64_t d = dim, hd = static_cast<int64_t>(heads) * dim;
      set_aligned_data(out, mx::Strides{queries * hd, d, hd, 1},
                       {/*contiguous=*/true, /*row_contiguous=*/false, /*col_contiguous=*/false});
    }
    auto& encoder = encoder_for(stream(), inputs, out);
    encoder.dispatch([q = mx::array::unsafe_weak_copy(q), k = mx::array::unsafe_weak_copy(k),
                      v = mx::array::unsafe_weak_copy(v), o = out.data<float>(), batch, heads, queries, keys, dim,
                      scale = scale_]() {
      std::vector<float> qc, kc, vc;
      attention_kernel(view_of(q, qc), view_of(k, kc), view_of(v, vc), o, batch, heads, queries, keys, dim, scale);
    });
  }

  const char* name() const override { return "SdxsAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const Attention&>(other).scale_;
  }

 private:
  float scale_;
};

}  // namespace

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale, mx::StreamOrDevice s) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4 || q.dtype() != mx::float32 || k.dtype() != mx::float32 ||
      v.dtype() != mx::float32)
    throw std::invalid_argument("sdxs attention: float32 (B, heads, tokens, head_dim) q, k, v only");
  if (k.shape() != v.shape() || q.shape(0) != k.shape(0) || q.shape(1) != k.shape(1) || q.shape(3) != k.shape(3))
    throw std::invalid_argument("sdxs attention: q, k, v shapes do not match");
  auto stream = mx::to_stream(s);
  return mx::array(q.shape(), mx::float32, std::make_shared<Attention>(stream, scale),
                   {q, k, v});
}

}  // namespace sdxs

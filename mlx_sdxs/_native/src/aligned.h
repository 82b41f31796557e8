// Outputs that start on a cache line. MLX's CPU allocator returns buffers 24 bytes past a 64-byte boundary,
// so every 64-byte vector store of a kernel would straddle two cache lines; the packed conv weights
// measured 12 % slower that way. The array keeps the whole buffer and starts at an offset into it.
#pragma once

#include <cstdint>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"

namespace sdxs {

constexpr size_t kAlign = 64;

inline uint8_t* aligned(uint8_t* p) {
  return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + kAlign - 1) / kAlign * kAlign);
}

// Gives `out` a fresh buffer with the given element strides (row-major when empty), its first element aligned.
inline void set_aligned_data(mlx::core::array& out, mlx::core::Strides strides = {},
                             mlx::core::array::Flags flags = {true, true, false}) {
  namespace mx = mlx::core;
  if (strides.empty()) {
    strides.resize(out.ndim());
    int64_t step = 1;
    int wide = 0;
    for (int i = out.ndim() - 1; i >= 0; --i) {
      strides[i] = step;
      step *= out.shape(i);
      wide += out.shape(i) > 1;
    }
    flags.col_contiguous = wide <= 1;
  }
  auto data = mx::allocator::malloc(out.nbytes() + kAlign);
  auto* raw = static_cast<uint8_t*>(data.buffer().raw_ptr());
  const int64_t offset = aligned(raw) - raw;
  out.set_data(std::move(data), out.size(), std::move(strides), flags, offset);
}

// For kernels that read each element before they write its output: `out` takes `x`'s buffer when MLX lets
// us have it (no other array holds it), which saves an allocation and a cold write, else a fresh aligned one.
inline void set_data_in_place_or_aligned(const mlx::core::array& x, mlx::core::array& out) {
  if (x.is_donatable() && x.flags().row_contiguous && x.itemsize() == out.itemsize())
    out.copy_shared_buffer(x);
  else
    set_aligned_data(out);
}

// `a`'s elements copied into `copy` in row-major order, for an operand whose strides a kernel cannot walk.
inline const float* row_major_copy(const mlx::core::array& a, std::vector<float>& copy) {
  copy.resize(a.size());
  const float* src = a.data<float>();
  const auto& strides = a.strides();
  std::vector<int> index(a.ndim(), 0);
  for (size_t n = 0; n < a.size(); ++n) {
    int64_t offset = 0;
    for (int i = 0; i < a.ndim(); ++i) offset += index[i] * strides[i];
    copy[n] = src[offset];
    for (int i = a.ndim() - 1; i >= 0 && ++index[i] == a.shape(i); --i) index[i] = 0;
  }
  return copy.data();
}

// The CPU command encoder of `stream`, told which arrays the dispatched kernel reads and writes.
inline mlx::core::cpu::CommandEncoder& encoder_for(const mlx::core::Stream& stream,
                                                   const std::vector<mlx::core::array>& inputs,
                                                   mlx::core::array& out) {
  auto& encoder = mlx::core::cpu::get_command_encoder(stream);
  for (const auto& in : inputs) encoder.set_input_array(in);
  encoder.set_output_array(out);
  return encoder;
}

}  // namespace sdxs

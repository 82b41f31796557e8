// Python bindings (nanobind, in MLX's nanobind domain so that mlx.core.array converts both ways).
#include <omp.h>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx/version.h"

#include "kernels.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace sdxs {

int threads() { return omp_get_max_threads(); }

void set_threads(int n) {
  if (n < 1) throw std::invalid_argument("threads must be at least 1");
  omp_set_num_threads(n);
}

bool cpu_supported() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return true;
#endif
}

}  // namespace sdxs

#define SDXS_STRINGIFY(x) #x
#define SDXS_VERSION_STRING(a, b, c) SDXS_STRINGIFY(a) "." SDXS_STRINGIFY(b) "." SDXS_STRINGIFY(c)

NB_MODULE(_ext, m) {
  m.doc() = "mlx-sdxs native CPU kernels (MLX primitives, float32, inference only)";
  m.attr("built_for_mlx") = SDXS_VERSION_STRING(MLX_VERSION_MAJOR, MLX_VERSION_MINOR, MLX_VERSION_PATCH);
  m.def("mlx_version", [] { return std::string(mlx::core::version()); }, "The libmlx this process runs.");
  m.def("onednn_version", &sdxs::onednn_version);
  m.def("threads", &sdxs::threads);
  m.def("set_threads", &sdxs::set_threads, "n"_a);
  m.def("cpu_supported", &sdxs::cpu_supported);
  m.def("conv2d", &sdxs::conv2d, "x"_a, "packed"_a, "weight_shape"_a, "bias"_a.none(), "residual"_a.none(),
        "stride"_a, "padding"_a, "activation"_a, nb::kw_only(), "stream"_a = nb::none(),
        "activation(conv2d(x, weight) + bias + residual): NHWC x, weight packed by pack_conv_weight; "
        "activation 0 none, 1 relu, 2 silu.");
  m.def("pack_conv_weight", &sdxs::pack_conv_weight, "weight"_a, "x_shape"_a, "stride"_a, "padding"_a,
        "activation"_a, "bias"_a, "residual"_a, nb::kw_only(), "stream"_a = nb::none(),
        "The OHWI weight reordered for conv2d on inputs of x_shape with this epilogue (uint8 bytes).");
  m.def("conv_weight_format", &sdxs::conv_weight_format, "x_shape"_a, "weight_shape"_a, "stride"_a, "padding"_a,
        "activation"_a, "bias"_a, "residual"_a, "The packed-weight format conv2d wants for this call.");
  m.def("group_norm", &sdxs::group_norm, "x"_a, "weight"_a, "bias"_a, "groups"_a, "eps"_a, "silu"_a, nb::kw_only(),
        "stream"_a = nb::none(), "PyTorch GroupNorm over NHWC x, optionally followed by SiLU.");
  m.def("layer_norm", &sdxs::layer_norm, "x"_a, "weight"_a, "bias"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
        "LayerNorm over the last axis, with weight and bias.");
  m.def("geglu", &sdxs::geglu, "value"_a, "gate"_a, nb::kw_only(), "stream"_a = nb::none(),
        "value · GELU(gate), exact-erf GELU (rational approximation, 4e-7).");
  m.def("phase_interleave", &sdxs::phase_interleave, "phases"_a, nb::kw_only(), "stream"_a = nb::none(),
        "(N, 2H, 2W, C) from the (N, H+1, W+1, 4·C) output of a nearest-2× upsample's 2×2 phase convolution.");
  m.def("attention", &sdxs::attention, "q"_a, "k"_a, "v"_a, "scale"_a, nb::kw_only(), "stream"_a = nb::none(),
        "softmax(q·kᵀ·scale)·v over (B, heads, tokens, head_dim).");
}

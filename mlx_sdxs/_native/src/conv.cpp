// NHWC convolution with fused bias, residual add and ReLU/SiLU, through oneDNN.
//
// Why oneDNN (the PyPI `onednn-cpu-gomp` build, 3.2): its JIT "brgconv" kernels take MLX's NHWC
// activations as they are (measured as fast as its blocked nChw16c layout here, so no layout
// reorders), run near the FMA peak on AVX2/AVX-512/AMX CPUs, and fuse the whole epilogue as post-ops.
// Its OpenMP runtime is GNU libgomp, the one our own kernels use, so everything shares one thread team.
//
// Per call only one small look-up happens: the primitive for this shape (created once, JIT included).
// The weights come already reordered into the primitive's blocked format by `pack_conv_weight`, which
// the Python side runs once per layer and format and keeps on the layer (an MLX buffer can be reused
// in place by a later op, so only the layer knows when its weight array was replaced).
#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>

#include <oneapi/dnnl/dnnl.hpp>

#include "mlx/allocator.h"
#include "mlx/ops.h"

#include "aligned.h"
#include "kernels.h"

namespace sdxs {

namespace {

using dnnl::memory;
using tag = memory::format_tag;

dnnl::engine& engine() {
  static dnnl::engine cpu(dnnl::engine::kind::cpu, 0);
  return cpu;
}

dnnl::stream& thread_stream() {
  thread_local dnnl::stream stream(engine());
  return stream;
}

struct ConvKey {
  int n, h, w, c, o, kh, kw, sh, sw, ph, pw, act;
  bool bias, residual;
  bool operator==(const ConvKey& k) const { return std::memcmp(this, &k, sizeof(ConvKey)) == 0; }
};

struct ConvKeyHash {
  size_t operator()(const ConvKey& k) const {
    size_t h = 1469598103934665603ull;
    const auto* bytes = reinterpret_cast<const unsigned char*>(&k);
    for (size_t i = 0; i < sizeof(ConvKey); ++i) h = (h ^ bytes[i]) * 1099511628211ull;
    return h;
  }
};

struct ConvPlan {
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward primitive;
  memory::desc user_weights;  // OHWI float32, as MLX stores it
};

std::shared_ptr<ConvPlan> plan_for(const ConvKey& k) {
  static std::mutex lock;
  static std::unordered_map<ConvKey, std::shared_ptr<ConvPlan>, ConvKeyHash> plans;
  std::lock_guard<std::mutex> guard(lock);
  if (auto it = plans.find(k); it != plans.end()) return it->second;
  const int oh = (k.h + 2 * k.ph - k.kh) / k.sh + 1, ow = (k.w + 2 * k.pw - k.kw) / k.sw + 1;
  const auto f32 = memory::data_type::f32;
  memory::desc src({k.n, k.c, k.h, k.w}, f32, tag::nhwc);
  memory::desc dst({k.n, k.o, oh, ow}, f32, tag::nhwc);
  memory::desc weights({k.o, k.c, k.kh, k.kw}, f32, tag::any);
  memory::desc bias = k.bias ? memory::desc({k.o}, f32, tag::a) : memory::desc();
  dnnl::post_ops ops;
  if (k.residual) ops.append_binary(dnnl::algorithm::binary_add, dst);
  if (k.act == static_cast<int>(Activation::relu)) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  if (k.act == static_cast<int>(Activation::silu)) ops.append_eltwise(dnnl::algorithm::eltwise_swish, 1.f, 0.f);
  dnnl::primitive_attr attr;
  attr.set_post_ops(ops);
  auto pd = dnnl::convolution_forward::primitive_desc(
      engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, src, weights, bias, dst,
      {k.sh, k.sw}, {k.ph, k.pw}, {k.ph, k.pw}, attr);
  auto plan = std::make_shared<ConvPlan>(
      ConvPlan{pd, dnnl::convolution_forward(pd), memory::desc({k.o, k.c, k.kh, k.kw}, f32, tag::ohwi)});
  plans.emplace(k, plan);
  return plan;
}

ConvKey key_of(const mx::Shape& x, const mx::Shape& w, std::pair<int, int> stride, std::pair<int, int> padding,
               int activation, bool bias, bool residual) {
  return {x[0], x[1], x[2], x[3], w[0], w[1], w[2], stride.first, stride.second, padding.first, padding.second,
          activation, bias, residual};
}

// Packed weights start at the first 64-byte boundary of their buffer (see aligned.h).
// OHWI weights reordered into a plan's format (a uint8 array of the packed bytes, after alignment padding).
class PackConvWeight : public CPUOnlyPrimitive {
 public:
  PackConvWeight(mx::Stream stream, ConvKey key) : CPUOnlyPrimitive(stream), key_(key) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto plan = plan_for(key_);
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = encoder_for(stream(), inputs, out);
    encoder.dispatch([plan, w = inputs[0].data<float>(), packed = out.data<uint8_t>()]() {
      memory from(plan->user_weights, engine(), const_cast<float*>(w)),
          to(plan->pd.weights_desc(), engine(), aligned(packed));
      dnnl::reorder(from, to).execute(thread_stream(), from, to);
      thread_stream().wait();
    });
  }

  const char* name() const override { return "SdxsPackConvWeight"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return key_ == static_cast<const PackConvWeight&>(other).key_;
  }

 private:
  ConvKey key_;
};

// A description of a memory format: equal strings, equal layouts.
std::string format_of(const memory::desc& d) {
  std::string text = std::to_string(d.get_size());
  for (auto v : d.get_dims()) text += " d" + std::to_string(v);
  for (auto v : d.get_strides()) text += " s" + std::to_string(v);
  for (auto v : d.get_inner_blks()) text += " b" + std::to_string(v);
  for (auto v : d.get_inner_idxs()) text += " i" + std::to_string(v);
  return text;
}

class Conv2d : public CPUOnlyPrimitive {
 public:
  Conv2d(mx::Stream stream, mx::Shape weight_shape, std::pair<int, int> stride, std::pair<int, int> padding,
         int activation, bool bias, bool residual)
      : CPUOnlyPrimitive(stream), weight_shape_(std::move(weight_shape)), stride_(stride), padding_(padding),
        activation_(activation), bias_(bias), residual_(residual) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& x = inputs[0];
    auto plan = plan_for(key_of(x.shape(), weight_shape_, stride_, padding_, activation_, bias_, residual_));
    if (inputs[1].nbytes() != plan->pd.weights_desc().get_size() + kAlign)
      throw std::invalid_argument("sdxs conv2d: the packed weights were packed for another format");
    set_aligned_data(out);
    auto& encoder = encoder_for(stream(), inputs, out);
    const float* bias = bias_ ? inputs[2].data<float>() : nullptr;
    const float* residual = residual_ ? inputs[bias_ ? 3 : 2].data<float>() : nullptr;
    encoder.dispatch([plan, x_ptr = x.data<float>(), w_ptr = inputs[1].data<uint8_t>(), bias, residual,
                      out_ptr = out.data<float>()]() {
      auto& s = thread_stream();
      auto& eng = engine();
      std::unordered_map<int, memory> args{
          {DNNL_ARG_SRC, memory(plan->pd.src_desc(), eng, const_cast<float*>(x_ptr))},
          {DNNL_ARG_WEIGHTS, memory(plan->pd.weights_desc(), eng, aligned(const_cast<uint8_t*>(w_ptr)))},
          {DNNL_ARG_DST, memory(plan->pd.dst_desc(), eng, out_ptr)}};
      if (bias) args.emplace(DNNL_ARG_BIAS, memory(plan->pd.bias_desc(), eng, const_cast<float*>(bias)));
      if (residual)
        args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1,
                     memory(plan->pd.dst_desc(), eng, const_cast<float*>(residual)));
      plan->primitive.execute(s, args);
      s.wait();
    });
  }

  const char* name() const override { return "SdxsConv2d"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const Conv2d&>(other);
    return weight_shape_ == o.weight_shape_ && stride_ == o.stride_ && padding_ == o.padding_ &&
           activation_ == o.activation_ && bias_ == o.bias_ && residual_ == o.residual_;
  }

 private:
  mx::Shape weight_shape_;
  std::pair<int, int> stride_, padding_;
  int activation_;
  bool bias_, residual_;
};

mx::Shape checked_output_shape(const mx::Shape& x, const mx::Shape& w, std::pair<int, int> stride,
                               std::pair<int, int> padding, int activation) {
  if (x.size() != 4 || w.size() != 4 || x[3] != w[3])
    throw std::invalid_argument("sdxs conv2d: x must be NHWC and weight OHWI with matching input channels");
  if (activation < 0 || activation > 2) throw std::invalid_argument("sdxs conv2d: activation must be 0, 1 or 2");
  if (stride.first < 1 || stride.second < 1 || padding.first < 0 || padding.second < 0)
    throw std::invalid_argument("sdxs conv2d: stride must be ≥ 1 and padding ≥ 0");
  const int oh = (x[1] + 2 * padding.first - w[1]) / stride.first + 1;
  const int ow = (x[2] + 2 * padding.second - w[2]) / stride.second + 1;
  if (oh < 1 || ow < 1) throw std::invalid_argument("sdxs conv2d: empty output");
  return {x[0], oh, ow, w[0]};
}

}  // namespace

std::string conv_weight_format(const std::vector<int>& x_shape, const std::vector<int>& weight_shape, std::pair<int, int> stride,
                               std::pair<int, int> padding, int activation, bool bias, bool residual) {
  const mx::Shape x(x_shape.begin(), x_shape.end()), w(weight_shape.begin(), weight_shape.end());
  checked_output_shape(x, w, stride, padding, activation);
  return format_of(plan_for(key_of(x, w, stride, padding, activation, bias, residual))->pd.weights_desc());
}

mx::array pack_conv_weight(const mx::array& weight, const std::vector<int>& x_shape, std::pair<int, int> stride,
                           std::pair<int, int> padding, int activation, bool bias, bool residual,
                           mx::StreamOrDevice s) {
  const mx::Shape x(x_shape.begin(), x_shape.end());
  checked_output_shape(x, weight.shape(), stride, padding, activation);
  if (weight.dtype() != mx::float32) throw std::invalid_argument("sdxs pack_conv_weight: float32 only");
  const auto key = key_of(x, weight.shape(), stride, padding, activation, bias, residual);
  const auto bytes = static_cast<int>(plan_for(key)->pd.weights_desc().get_size() + kAlign);
  auto stream = mx::to_stream(s);
  return mx::array({bytes}, mx::uint8, std::make_shared<PackConvWeight>(stream, key),
                   {mx::contiguous(weight, false, stream)});
}

mx::array conv2d(const mx::array& x, const mx::array& packed, const std::vector<int>& weight_list,
                 const std::optional<mx::array>& bias, const std::optional<mx::array>& residual,
                 std::pair<int, int> stride, std::pair<int, int> padding, int activation, mx::StreamOrDevice s) {
  const mx::Shape weight_shape(weight_list.begin(), weight_list.end());
  const auto out_shape = checked_output_shape(x.shape(), weight_shape, stride, padding, activation);
  if (x.dtype() != mx::float32) throw std::invalid_argument("sdxs conv2d: float32 only");
  if (packed.dtype() != mx::uint8 || packed.ndim() != 1)
    throw std::invalid_argument("sdxs conv2d: weights must come from pack_conv_weight");
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs{mx::contiguous(x, false, stream), packed};
  if (bias) {
    if (bias->ndim() != 1 || bias->shape(0) != weight_shape[0] || bias->dtype() != mx::float32)
      throw std::invalid_argument("sdxs conv2d: bias must be float32 (out_channels,)");
    inputs.push_back(mx::contiguous(*bias, false, stream));
  }
  if (residual) {
    if (residual->shape() != out_shape || residual->dtype() != mx::float32)
      throw std::invalid_argument("sdxs conv2d: residual must be float32 with the output's shape");
    inputs.push_back(mx::contiguous(*residual, false, stream));
  }
  return mx::array(out_shape, mx::float32,
                   std::make_shared<Conv2d>(stream, weight_shape, stride, padding, activation, bias.has_value(),
                                            residual.has_value()),
                   std::move(inputs));
}

std::string onednn_version() {
  const auto* v = dnnl::version();
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
}

}  // namespace sdxs

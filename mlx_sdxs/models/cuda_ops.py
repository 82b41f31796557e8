"""The `cuda` kernel policy: the portable ops with single custom CUDA kernels (`mx.fast.cuda_kernel`) where
MLX's composition launches several. On a GPU the frame is bound by the host's per-kernel cost (MLX records
every kernel into a CUDA graph on the host), so each kernel saved is time saved, whatever its size.

- GroupNorm(+SiLU): the portable composition is a transposing copy, `mx.fast.layer_norm` and a scale-shift
  pass; here one kernel reads NHWC directly, one thread block per (image, group): the mean, then the
  centred variance (two passes over the group, which sits in L2: E[x²]−E[x]² loses every digit when
  |mean| ≫ std), then the normalised, scaled, shifted (and SiLU'd) output. Statistics in float32 for every
  input dtype, summed relative to the group's first element, so a large common offset costs no digits.

The kernels are compiled by NVRTC on first use (cached on disk, `MLX_PTX_CACHE_DIR`); anything they do
not take (other layouts, float64) goes to the portable set.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_sdxs.models.ops import PortableOps

_THREADS = 512

_BLOCK_SUM = """
__device__ float block_sum(float value, float* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffff, value, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < (blockDim.x >> 5) ? shared[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffff, value, offset);
    if (lane == 0) shared[32] = value;
  }
  __syncthreads();
  const float total = shared[32];
  __syncthreads();  // `shared` is reused by the next call
  return total;
}
"""

# One block per (image, group). x is (N, ..., C) row-contiguous; `params` holds eps. Element i of the
# group is pixel i / per_group, channel group * per_group + i % per_group: consecutive threads read
# consecutive channels of a pixel, then the next pixel.
_GROUP_NORM = """
  __shared__ float shared[33];
  const int channels = x_shape[x_ndim - 1];
  long long pixels = 1;
  for (int axis = 1; axis < x_ndim - 1; ++axis) pixels *= x_shape[axis];
  const int per_group = channels / GROUPS;
  const int image = blockIdx.x / GROUPS, group = blockIdx.x % GROUPS;
  const long long count = pixels * per_group;
  const long long start = (long long)image * pixels * channels + (long long)group * per_group;
  const T* in = x + start;
  T* result = out + start;
  const float offset = static_cast<float>(in[0]);

  float sum = 0.0f;
  for (long long i = threadIdx.x; i < count; i += blockDim.x) {
    const long long pixel = i / per_group;
    sum += static_cast<float>(in[pixel * channels + (i - pixel * per_group)]) - offset;
  }
  const float mean = block_sum(sum, shared) / count;  // of x − offset
  float squares = 0.0f;
  for (long long i = threadIdx.x; i < count; i += blockDim.x) {
    const long long pixel = i / per_group;
    const float centred = static_cast<float>(in[pixel * channels + (i - pixel * per_group)]) - offset - mean;
    squares += centred * centred;
  }
  const float inv_std = rsqrtf(block_sum(squares, shared) / count + params[0]);
  for (long long i = threadIdx.x; i < count; i += blockDim.x) {
    const long long pixel = i / per_group;
    const int c = (int)(i - pixel * per_group);
    const long long at = pixel * channels + c;
    const int channel = group * per_group + c;
    float y = (static_cast<float>(in[at]) - offset - mean) * inv_std * static_cast<float>(weight[channel])
              + static_cast<float>(bias[channel]);
    if (SILU) y = y / (1.0f + __expf(-y));
    result[at] = static_cast<T>(y);
  }
"""

_kernels: dict[str, object] = {}


def _group_norm_kernel():
    if "group_norm" not in _kernels:
        _kernels["group_norm"] = mx.fast.cuda_kernel(
            name="sdxs_group_norm", input_names=["x", "weight", "bias", "params"], output_names=["out"],
            source=_GROUP_NORM, header=_BLOCK_SUM)
    return _kernels["group_norm"]


class CUDAOps(PortableOps):
    """Portable ops with the custom CUDA kernels above; used only where MLX computes on a CUDA GPU."""

    name = "cuda"

    def __init__(self) -> None:
        self._eps: dict[float, mx.array] = {}

    def group_norm(self, norm, x: mx.array, with_silu: bool = False) -> mx.array:
        channels = x.shape[-1]
        if not (x.ndim >= 2 and x.dtype in (mx.float16, mx.bfloat16, mx.float32) and x.size
                and channels % norm.num_groups == 0 and norm.weight.shape == (channels,)):
            return super().group_norm(norm, x, with_silu)
        if norm.eps not in self._eps:
            self._eps[norm.eps] = mx.array([norm.eps], dtype=mx.float32)
        blocks = x.shape[0] * norm.num_groups
        return _group_norm_kernel()(
            inputs=[x, norm.weight, norm.bias, self._eps[norm.eps]],
            template=[("T", x.dtype), ("GROUPS", norm.num_groups), ("SILU", with_silu)],
            grid=(blocks * _THREADS, 1, 1), threadgroup=(_THREADS, 1, 1),
            output_shapes=[x.shape], output_dtypes=[x.dtype])[0]

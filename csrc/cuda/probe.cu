// vpfast::_cuda_probe(x) = x + 0 through a real CUDA kernel on the current stream.
//
// A smoke test for the CUDA half of the build: if it runs, the extension was
// compiled for this GPU's architecture and launches correctly. The PGN
// token-mixing kernels will follow the same pattern.

#include <cuda_runtime.h>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/shim_utils.h>

#include <algorithm>
#include <cstdint>

namespace vpfast {

__global__ void add_zero_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    y[i] = x[i] + 0.0f;
  }
}

torch::stable::Tensor cuda_probe(const torch::stable::Tensor& x) {
  STD_TORCH_CHECK(x.is_cuda(), "vpfast::_cuda_probe expects a CUDA tensor");
  STD_TORCH_CHECK(x.scalar_type() == torch::headeronly::ScalarType::Float,
                  "vpfast::_cuda_probe expects float32");
  const torch::stable::Tensor xc = torch::stable::contiguous(x);
  torch::stable::Tensor y = torch::stable::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) {
    return y;
  }
  const int32_t device = xc.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  constexpr int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
  add_zero_kernel<<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(
      xc.const_data_ptr<float>(), y.mutable_data_ptr<float>(), n);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace vpfast

STABLE_TORCH_LIBRARY_IMPL(vpfast, CUDA, m) {
  m.impl("_cuda_probe", TORCH_BOX(&vpfast::cuda_probe));
}

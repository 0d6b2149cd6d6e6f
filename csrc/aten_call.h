// ATen ops called from the extension through torch's stable C ABI (torch_call_dispatcher), for the
// work ATen already does well: BLAS/cuBLAS products, softmax. Shared by the CPU and CUDA paths.

#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/shim_utils.h>

#include <array>

namespace vpfast {

// Calls ATen's `name.overload` with `args` (tensors, ints, bools, dtypes) and returns its first result
// (for an in-place or out= op, the alias of the tensor it wrote).
template <class... Args>
torch::stable::Tensor call_aten(const char* name, const char* overload, Args... args) {
  std::array<StableIValue, sizeof...(Args)> stack{torch::stable::detail::from(args)...};
  TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<torch::stable::Tensor>(stack[0]);
}

}  // namespace vpfast

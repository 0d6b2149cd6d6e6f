// vpfast::_ext_token_mix and vpfast::_ext_token_mix_backward on CUDA tensors (the "cuda" backend of
// token_mix, schemas in vpfast/ops/token_mix.py): argument checks, buffers and launches on the current
// stream (the kernels and what they compute: token_mix_kernels.cuh).
//
// Besides the outputs, the forward allocates a workspace of at most kWorkspaceWeights weights, the
// backward B*M x 5 floats of row statistics. The products go through aten::mm.out on views of
// these buffers. Nothing synchronizes with the host, so both ops can be captured in a CUDA graph.

#include <cuda_runtime.h>

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/shim_utils.h>

#include <string>
#include <tuple>

#include "token_mix_kernels.cuh"

namespace vpfast::token_mix {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Calls f(scalar_t{}) for the CUDA kernels' dtypes.
template <class F>
void dispatch_cuda_dtype(ScalarType dtype, F&& f) {
  switch (dtype) {
    case ScalarType::Float:
      return f(float{});
    case ScalarType::BFloat16:
      return f(__nv_bfloat16{});
    case ScalarType::Half:
      return f(__half{});
    default:
      STD_TORCH_CHECK(false, "vpfast::token_mix: the CUDA kernels take float32, bfloat16 or float16, got ",
                      torch::headeronly::toString(dtype), " (the Python op runs the reference for float64)");
  }
}

// Runs a kernel on the current stream of the tensors' device, with launch errors checked.
struct StreamLauncher {
  cudaStream_t stream;

  template <class Kernel, class... Args>
  void operator()(Kernel kernel, dim3 grid, dim3 block, Args... args) const {
    kernel<<<grid, block, 0, stream>>>(args...);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

StreamLauncher launcher_for(const Tensor& t) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return StreamLauncher{static_cast<cudaStream_t>(stream)};
}

AtenGemm gemm_for(const Tensor& t) {
  return AtenGemm{torch::headeronly::DeviceType::CUDA, static_cast<int8_t>(t.get_device_index()), t.scalar_type()};
}

void check_cuda(const Tensor& logits) {
  STD_TORCH_CHECK(logits.is_cuda(), "vpfast::token_mix: the CUDA kernel got tensors that are not on a CUDA device");
}

Tensor token_mix_cuda(const Tensor& logits, const Tensor& library, double tau, bool gumbel, int64_t seed,
                      int64_t topk, bool hard, std::string activation) {
  const Options o = checked_options(logits, library, tau, gumbel, seed, topk, hard, activation);
  check_cuda(logits);
  const Tensor z = torch::stable::contiguous(logits);
  const Tensor t = torch::stable::contiguous(library);
  const int64_t rows = z.size(0) * z.size(1), n = z.size(2), d = t.size(1);
  const int64_t chunk_rows = weight_chunk_rows(rows, n);
  torch::stable::accelerator::DeviceGuard guard(z.get_device_index());
  Tensor p = torch::stable::new_empty(z, {z.size(0), z.size(1), d});
  Tensor workspace = torch::stable::new_empty(z, {chunk_rows, n});
  dispatch_cuda_dtype(z.scalar_type(), [&](auto scalar) {
    using scalar_t = decltype(scalar);
    forward_launches<scalar_t>(launcher_for(z), gemm_for(z), static_cast<const scalar_t*>(z.const_data_ptr()),
                               static_cast<const scalar_t*>(t.const_data_ptr()),
                               static_cast<scalar_t*>(workspace.mutable_data_ptr()), chunk_rows,
                               static_cast<scalar_t*>(p.mutable_data_ptr()), rows, n, d, o);
  });
  return p;
}

std::tuple<Tensor, Tensor> token_mix_backward_cuda(const Tensor& grad, const Tensor& logits, const Tensor& library,
                                                   double tau, bool gumbel, int64_t seed, int64_t topk, bool hard,
                                                   std::string activation) {
  const Options o = checked_options(logits, library, tau, gumbel, seed, topk, hard, activation);
  check_grad(grad, logits, library);
  check_cuda(logits);
  const Tensor dp = torch::stable::contiguous(grad);
  const Tensor z = torch::stable::contiguous(logits);
  const Tensor t = torch::stable::contiguous(library);
  const int64_t rows = z.size(0) * z.size(1), n = z.size(2), d = t.size(1);
  torch::stable::accelerator::DeviceGuard guard(z.get_device_index());
  Tensor dz = torch::stable::new_empty(z, {z.size(0), z.size(1), n});
  Tensor dt = torch::stable::new_empty(t, {n, d});
  Tensor stats = torch::stable::new_empty(z, {rows, 5}, ScalarType::Float);
  dispatch_cuda_dtype(z.scalar_type(), [&](auto scalar) {
    using scalar_t = decltype(scalar);
    backward_launches<scalar_t>(launcher_for(z), gemm_for(z), static_cast<const scalar_t*>(dp.const_data_ptr()),
                                static_cast<const scalar_t*>(z.const_data_ptr()),
                                static_cast<const scalar_t*>(t.const_data_ptr()),
                                static_cast<RowStats*>(stats.mutable_data_ptr()),
                                static_cast<scalar_t*>(dz.mutable_data_ptr()),
                                static_cast<scalar_t*>(dt.mutable_data_ptr()), rows, n, d, o);
  });
  return {dz, dt};
}

}  // namespace
}  // namespace vpfast::token_mix

STABLE_TORCH_LIBRARY_IMPL(vpfast, CUDA, m) {
  m.impl("_ext_token_mix", TORCH_BOX(&vpfast::token_mix::token_mix_cuda));
  m.impl("_ext_token_mix_backward", TORCH_BOX(&vpfast::token_mix::token_mix_backward_cuda));
}

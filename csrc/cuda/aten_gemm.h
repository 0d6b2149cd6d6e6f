// c = a @ b by aten::mm.out on non-owning views of raw buffers, through torch's stable C ABI. On CUDA
// that is cuBLAS with torch's handle, stream and workspace and the user's matmul settings (TF32,
// reduced-precision reductions), as eager PyTorch's product. Host code only: the CUDA launcher
// (token_mix.cu) uses it, and the CPU emulation (token_mix_emulation.cpp) runs the same launch
// sequences with it on CPU buffers, so the views' shapes and strides are tested without a GPU.

#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdint>

#include "../aten_call.h"

namespace vpfast::token_mix {

// A matrix in memory: element (i, j) at data[i * row_stride + j * col_stride].
template <class T>
struct MatrixView {
  T* data;
  int64_t rows, cols, row_stride, col_stride;
};

struct AtenGemm {
  torch::headeronly::DeviceType device_type;
  int8_t device_index;
  torch::headeronly::ScalarType dtype;

  template <class T>
  torch::stable::Tensor view(MatrixView<T> m) const {
    const int64_t sizes[] = {m.rows, m.cols}, strides[] = {m.row_stride, m.col_stride};
    return torch::stable::from_blob(const_cast<void*>(static_cast<const void*>(m.data)),
                                    torch::headeronly::IntHeaderOnlyArrayRef(sizes, 2),
                                    torch::headeronly::IntHeaderOnlyArrayRef(strides, 2),
                                    torch::stable::Device(device_type, device_index), dtype);
  }

  template <class T>
  void operator()(MatrixView<T> c, MatrixView<const T> a, MatrixView<const T> b) const {
    call_aten("aten::mm", "out", view(a), view(b), view(c));
  }
};

}  // namespace vpfast::token_mix

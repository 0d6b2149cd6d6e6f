// vpfast._C: the compiled part of vpfast, built against the PyTorch stable ABI.
//
// This file owns the `vpfast` operator namespace on the C++ side (the one
// STABLE_TORCH_LIBRARY for it; Python ops such as vpfast::compose join the same
// namespace through torch.library fragments) and holds the CPU kernels. CUDA
// kernels live in csrc/cuda/ and are compiled only when the build finds nvcc.
// Only stable headers are used, so one binary loads on every torch >= the
// TORCH_TARGET_VERSION set by setup.py and on every Python >= 3.10 (abi3).

#include <Python.h>

#include <torch/csrc/stable/library.h>

#include <cstdint>

namespace vpfast {

// Bit flags describing this build; Python reads them through the op below.
constexpr int64_t kHasCudaKernels = 1;

int64_t extension_info() {
  int64_t flags = 0;
#ifdef VPFAST_WITH_CUDA
  flags |= kHasCudaKernels;
#endif
  return flags;
}

}  // namespace vpfast

STABLE_TORCH_LIBRARY(vpfast, m) {
  m.def("_extension_info() -> int");
  m.def("_cuda_probe(Tensor x) -> Tensor");
  // PGN token-library soft sampling; kernels in csrc/token_mix.cpp (CPU) and csrc/cuda/token_mix.cu.
  m.def("token_mix(Tensor logits, Tensor library, float tau, bool gumbel, int seed, int topk, bool hard, "
        "str activation) -> Tensor");
  m.def("token_mix_backward(Tensor grad, Tensor logits, Tensor library, float tau, bool gumbel, int seed, "
        "int topk, bool hard, str activation) -> (Tensor, Tensor)");
}

// No tensor arguments, so the op needs a backend-independent kernel.
STABLE_TORCH_LIBRARY_IMPL(vpfast, CompositeExplicitAutograd, m) {
  m.impl("_extension_info", TORCH_BOX(&vpfast::extension_info));
}

// `import vpfast._C` loads this library (running the registrations above); the
// module itself is empty. Py_LIMITED_API is defined by the build.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

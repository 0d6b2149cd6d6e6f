// vpfast._C: the compiled part of vpfast, built against the PyTorch stable ABI.
//
// The extension provides kernels only: every op's schema, fake, autograd and backend
// selection is defined in Python (vpfast/ops/), including the schemas of the kernel ops
// vpfast::_ext_token_mix and vpfast::_ext_token_mix_backward that csrc/token_mix.cpp
// (CPU) and csrc/cuda/token_mix.cu (CUDA) implement. This file defines only the build's
// own two introspection ops. CUDA kernels live in csrc/cuda/ and are compiled only when
// the build finds nvcc.
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

STABLE_TORCH_LIBRARY_FRAGMENT(vpfast, m) {
  m.def("_extension_info() -> int");
  m.def("_cuda_probe(Tensor x) -> Tensor");
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

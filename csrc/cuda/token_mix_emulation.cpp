// The CUDA kernels of token_mix_kernels.cuh run on the CPU, for tests on machines without a GPU.
//
// Not part of the extension: tests/test_token_mix.py compiles this file with the host C++ compiler
// into a small shared library and calls its extern "C" entry point through ctypes. Each CUDA
// thread is a std::thread, blocks run one after another and warp shuffles exchange through a
// per-warp slot array. The products run through the launcher's own AtenGemm, on CPU views of the
// buffers (so this links libtorch). What this cannot show: nvcc's code generation, the GPU memory
// model, cuBLAS itself, speed.

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

thread_local dim3 threadIdx, blockIdx;

namespace emulation {

struct Warp {
  std::barrier<> barrier{32};
  uint64_t slot[32];
};

std::vector<std::unique_ptr<Warp>> warps;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "token_mix emulation: %s\n", what);
  std::abort();
}

}  // namespace emulation

template <class T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 64 bits");
  emulation::Warp& warp = *emulation::warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  warp.slot[lane] = bits;
  warp.barrier.arrive_and_wait();
  bits = warp.slot[lane ^ static_cast<unsigned>(lane_mask)];
  warp.barrier.arrive_and_wait();  // every lane has read before the next shuffle writes
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline uint32_t __float_as_uint(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline float __uint_as_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

using __nv_bfloat16 = torch::headeronly::BFloat16;  // float conversions round to nearest even, as CUDA's
using __half = torch::headeronly::Half;
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }
inline __nv_bfloat16 __float2bfloat16(float x) { return __nv_bfloat16(x); }
inline float __half2float(__half x) { return static_cast<float>(x); }
inline __half __float2half(float x) { return __half(x); }

#include "token_mix_kernels.cuh"

namespace vpfast::token_mix {
namespace {

// kernel<<<grid, block>>>(args...): one std::thread per CUDA thread, the blocks one after another.
struct EmulatedLauncher {
  template <class Kernel, class... Args>
  void operator()(Kernel kernel, dim3 grid, dim3 block, Args... args) const {
    if (block.y != 1 || block.z != 1 || block.x % 32 != 0) {
      emulation::fail("blocks must be one-dimensional whole warps");
    }
    const int64_t blocks = int64_t{grid.x} * grid.y * grid.z;
    emulation::warps.clear();
    for (unsigned w = 0; w < block.x / 32; ++w) {
      emulation::warps.push_back(std::make_unique<emulation::Warp>());
    }
    std::barrier<> between_blocks(block.x);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block.x; ++t) {
      threads.emplace_back([&, t] {
        threadIdx = dim3(t);
        for (int64_t b = 0; b < blocks; ++b) {
          blockIdx = dim3(b % grid.x, b / grid.x % grid.y, b / grid.x / grid.y);
          kernel(args...);
          between_blocks.arrive_and_wait();  // one block at a time
        }
      });
    }
    for (std::thread& thread : threads) {
      thread.join();
    }
  }
};

Options emulated_options(int64_t n, double tau, int gumbel, int64_t seed, int64_t topk, int hard, int sigmoid) {
  return Options{tau,
                 topk >= n ? 0 : topk,
                 static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffU),
                 static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32),
                 gumbel != 0,
                 hard != 0,
                 sigmoid != 0};
}

template <class scalar_t>
void run(torch::headeronly::ScalarType dtype, bool backward, const void* dp, const void* z, const void* t, void* out,
         void* dz, int64_t rows, int64_t n, int64_t d, const Options& o, int64_t chunk_rows) {
  const AtenGemm gemm{torch::headeronly::DeviceType::CPU, -1, dtype};
  const auto* zs = static_cast<const scalar_t*>(z);
  const auto* ts = static_cast<const scalar_t*>(t);
  if (backward) {
    std::vector<RowStats> stats(rows);
    backward_launches<scalar_t>(EmulatedLauncher{}, gemm, static_cast<const scalar_t*>(dp), zs, ts,
                                stats.data(), static_cast<scalar_t*>(dz), static_cast<scalar_t*>(out), rows, n, d, o);
    return;
  }
  std::vector<scalar_t> workspace(chunk_rows * n, static_cast<scalar_t>(NAN));
  forward_launches<scalar_t>(EmulatedLauncher{}, gemm, zs, ts, workspace.data(), chunk_rows,
                             static_cast<scalar_t*>(out), rows, n, d, o);
}

// Counts what a launch sequence issues, running nothing: the launch plan.
struct Counter {
  int64_t* kernels;
  int64_t* gemms;

  template <class Kernel, class... Args>
  void operator()(Kernel, dim3, dim3, Args...) const {
    ++*kernels;
  }
  template <class T>
  void operator()(MatrixView<T>, MatrixView<const T>, MatrixView<const T>) const {
    ++*gemms;
  }
};

}  // namespace
}  // namespace vpfast::token_mix

// The launch plan of the CUDA launcher (token_mix.cu) for `rows` x `n` logits and d-wide tokens:
// kernel launches and GEMMs of the forward (backward = 0) or of the backward, as the launcher would issue
// them (the workspace size is the launcher's own choice).
extern "C" void vpfast_token_mix_launch_plan(int backward, int64_t rows, int64_t n, int64_t d, int64_t* kernels,
                                             int64_t* gemms) {
  using namespace vpfast::token_mix;
  *kernels = *gemms = 0;
  const Counter count{kernels, gemms};
  const Options o{};
  if (backward != 0) {
    backward_launches<float>(count, count, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, rows, n, d, o);
  } else {
    forward_launches<float>(count, count, nullptr, nullptr, nullptr, weight_chunk_rows(rows, n), nullptr, rows, n,
                            d, o);
  }
}

// dtype: 0 float32, 1 bfloat16, 2 float16. Forward: out = P (rows x d). Backward (dp given): dz (rows x n)
// and out = dT (n x d). chunk_rows: rows per forward chunk, 0 for the CUDA launcher's choice.
extern "C" void vpfast_token_mix_emulated(int dtype, const void* dp, const void* z, const void* t, void* out,
                                          void* dz, int64_t rows, int64_t n, int64_t d, double tau, int gumbel,
                                          int64_t seed, int64_t topk, int hard, int sigmoid,
                                          int64_t chunk_rows) {
  using namespace vpfast::token_mix;
  using torch::headeronly::ScalarType;
  const Options o = emulated_options(n, tau, gumbel, seed, topk, hard, sigmoid);
  const bool backward = dp != nullptr;
  if (chunk_rows <= 0) {
    chunk_rows = weight_chunk_rows(rows, n);
  }
  switch (dtype) {
    case 0:
      return run<float>(ScalarType::Float, backward, dp, z, t, out, dz, rows, n, d, o, chunk_rows);
    case 1:
      return run<__nv_bfloat16>(ScalarType::BFloat16, backward, dp, z, t, out, dz, rows, n, d, o, chunk_rows);
    case 2:
      return run<__half>(ScalarType::Half, backward, dp, z, t, out, dz, rows, n, d, o, chunk_rows);
    default:
      emulation::fail("unknown dtype code");
  }
}

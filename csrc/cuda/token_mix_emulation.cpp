// The CUDA kernels of token_mix_kernels.cuh run on the CPU, for tests on machines without a GPU.
//
// Not part of the extension: tests/test_token_mix.py compiles this file with the host C++ compiler
// into a small shared library and calls the two extern "C" entry points through ctypes. Each CUDA
// thread is a std::thread, blocks run one after another (so `__shared__` can be a function-local
// static), __syncthreads is a std::barrier over the block and warp shuffles exchange through a
// per-warp slot array. WMMA fragments hold the whole 16 x 16 tile in every lane (the API is
// warp-collective, so its result does not depend on the hardware's fragment layout); loads and stores
// check WMMA's alignment rules. What this cannot show: nvcc's code generation, the GPU memory model,
// real tensor-core rounding, speed.

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
#define __host__
#define __forceinline__ inline
#define __shared__ static
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

thread_local std::barrier<>* block_barrier = nullptr;
std::vector<std::unique_ptr<Warp>> warps;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "token_mix emulation: %s\n", what);
  std::abort();
}

}  // namespace emulation

inline void __syncthreads() { emulation::block_barrier->arrive_and_wait(); }

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

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
enum layout_t { mem_row_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  float v[16][16];
};

template <class Fragment>
void fill_fragment(Fragment& f, float x) {
  for (auto& row : f.v) {
    for (float& e : row) {
      e = x;
    }
  }
}

inline void check_alignment(const void* p, unsigned ldm, unsigned ldm_multiple) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    emulation::fail("WMMA tile pointer not 32-byte aligned");
  }
  if (ldm % ldm_multiple != 0) {
    emulation::fail("WMMA leading dimension not a multiple of 16 bytes");
  }
}

template <class Use, class T>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  check_alignment(p, ldm, 8);
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      f.v[i][j] = static_cast<float>(p[i * ldm + j]);
    }
  }
}

template <class T>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
              const fragment<matrix_b, 16, 16, 16, T, row_major>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  fragment<accumulator, 16, 16, 16, float> out;
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float sum = c.v[i][j];
      for (int k = 0; k < 16; ++k) {
        sum += a.v[i][k] * b.v[k][j];
      }
      out.v[i][j] = sum;
    }
  }
  d = out;
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t) {
  check_alignment(p, ldm, 4);
  if (threadIdx.x % 32 != 0) {
    return;  // every lane holds the same tile; one writes it
  }
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      p[i * ldm + j] = f.v[i][j];
    }
  }
}

}  // namespace nvcuda::wmma

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
    std::vector<std::unique_ptr<std::barrier<>>> block_barriers;  // fresh per block: threads drop out on return
    for (int64_t b = 0; b < blocks; ++b) {
      block_barriers.push_back(std::make_unique<std::barrier<>>(block.x));
    }
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
          emulation::block_barrier = block_barriers[b].get();
          kernel(args...);
          block_barriers[b]->arrive_and_drop();  // a finished thread no longer holds up __syncthreads
          between_blocks.arrive_and_wait();       // one block at a time: __shared__ is a static
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
void run(bool backward, const void* dp, const void* z, const void* t, void* out, void* dz, int64_t rows, int64_t n,
         int64_t d, const Options& o, int sm_count) {
  using math_t = scalar_t;  // as the CUDA launcher: float FMA tiles, WMMA for the 16-bit types
  std::vector<RowStats> stats(rows);
  const auto* zs = static_cast<const scalar_t*>(z);
  const auto* ts = static_cast<const scalar_t*>(t);
  if (!backward) {
    forward_launches<scalar_t, math_t>(EmulatedLauncher{}, zs, ts, stats.data(), static_cast<scalar_t*>(out), rows,
                                       n, d, o);
    return;
  }
  const int64_t splits = grad_library_splits(rows, n, d, sm_count);
  std::vector<float> partial(splits * n * d, NAN);
  backward_launches<scalar_t, math_t>(EmulatedLauncher{}, static_cast<const scalar_t*>(dp), zs, ts, stats.data(),
                                      static_cast<scalar_t*>(dz), partial.data(), splits, rows, n, d, o);
  auto* dt = static_cast<scalar_t*>(out);
  for (int64_t i = 0; i < n * d; ++i) {
    float sum = 0.f;
    for (int64_t s = 0; s < splits; ++s) {
      sum += partial[s * n * d + i];
    }
    dt[i] = static_cast<scalar_t>(sum);
  }
}

}  // namespace
}  // namespace vpfast::token_mix

// dtype: 0 float32, 1 bfloat16, 2 float16. Forward: out = P (rows x d). Backward (dp given): dz (rows x n)
// and out = dT (n x d). sm_count only sets how the library gradient splits the rows.
extern "C" void vpfast_token_mix_emulated(int dtype, const void* dp, const void* z, const void* t, void* out,
                                          void* dz, int64_t rows, int64_t n, int64_t d, double tau, int gumbel,
                                          int64_t seed, int64_t topk, int hard, int sigmoid, int sm_count) {
  using namespace vpfast::token_mix;
  const Options o = emulated_options(n, tau, gumbel, seed, topk, hard, sigmoid);
  const bool backward = dp != nullptr;
  switch (dtype) {
    case 0:
      return run<float>(backward, dp, z, t, out, dz, rows, n, d, o, sm_count);
    case 1:
      return run<__nv_bfloat16>(backward, dp, z, t, out, dz, rows, n, d, o, sm_count);
    case 2:
      return run<__half>(backward, dp, z, t, out, dz, rows, n, d, o, sm_count);
    default:
      emulation::fail("unknown dtype code");
  }
}

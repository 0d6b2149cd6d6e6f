// CUDA kernels of vpfast::token_mix and vpfast::token_mix_backward (contract: csrc/token_mix.h).
//
// No B x M x N weight or gradient tensor is written besides dZ itself. A first kernel computes each
// row's statistics (max and argmax of S, the softmax normalizer, the top-k threshold, the row's hash
// key) into a B*M buffer; every later kernel recomputes a weight A[r, n] from Z[r, n] and its row's
// statistics when it loads it, as FlashAttention recomputes attention weights from the logsumexp:
//
//   forward          P = A_fwd @ T             (A_fwd = onehot(argmax S) in hard mode, else A)
//   logits grad      dZ = dS / tau, dS = A (dA - rowsum(A dA)) for softmax, A (1 - A) dA for sigmoid,
//                    dA = dP @ T^T             (A soft also in hard mode: straight-through)
//   library grad     dT = A_fwd^T @ dP         (split over rows into float32 partials, summed by the caller)
//
// The three products share one tile engine (gemm_tile): the block's 256 threads stage a BM x BK and a
// BK x BN operand tile in shared memory through loader callbacks (which apply the softmax on the fly)
// and accumulate a BM x BN float tile: FMA micro-tiles for float32, WMMA 16x16x16 tensor-core tiles
// with float accumulation for bfloat16 and float16 (the weights are rounded to the input dtype for
// the tensor cores, as an eager bfloat16 softmax would). Accumulation is always in float32.
//
// Host-side launch sequences (forward_launches, backward_launches) take a `launch` callback so the
// same sequence runs from the torch launcher (token_mix.cu) and from the CPU emulation used in the
// tests (token_mix_emulation.cpp).

#pragma once

#ifdef __CUDACC__  // else the includer provides these (the CPU emulation does)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#include <cstdint>
#include <type_traits>

#include "../token_mix.h"

namespace vpfast::token_mix {

// Threads of every GEMM block. Their kernels declare __launch_bounds__(kThreads, 1): with the minimum
// of blocks per SM left out, nvcc 13.0 capped them at 64 registers and the float dZ kernel spilled.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStatsWarps = 4;  // rows per block of the statistics kernel (one warp per row)
constexpr int kTile = 64;       // BM = BN of the forward and library-gradient tiles
constexpr int kGradRows = 32;   // BM of the logits-gradient tile (it loops over all N itself)
constexpr int kTileK = 32;      // BK of every tile
constexpr uint32_t kNoArgmax = 0xffffffffU;

// What the statistics kernel leaves for each row r = b * M + m.
struct RowStats {
  float max;        // max of S (kept by top-k)
  float inv_sum;    // 1 / sum of exp(S - max) over the kept entries (softmax)
  float threshold;  // keep S >= threshold (-inf without top-k)
  uint32_t argmax;  // first index of the max
  uint32_t key;     // the row's Gumbel hash key
};
static_assert(sizeof(RowStats) == 5 * sizeof(float), "RowStats is stored as 5 floats per row");

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

template <class T>
__device__ __forceinline__ T warp_sum(T x) {
  for (int offset = 16; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffU, x, offset);
  }
  return x;
}

// Order-preserving map of floats (no NaN) onto uint32, and back.
__device__ __forceinline__ uint32_t ordered_key(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000U) ? ~u : (u | 0x80000000U);
}
__device__ __forceinline__ float from_ordered_key(uint32_t k) {
  return __uint_as_float((k & 0x80000000U) ? (k & 0x7fffffffU) : ~k);
}

// The k-th largest of s_at(0..n-1) counting repeats (the warp's lanes cooperate; all get the result):
// the largest key v with #{s >= v} >= k, built bit by bit from the top (32 counting passes, no storage).
template <class F>
__device__ float kth_largest(F s_at, int64_t n, int64_t k, int lane) {
  uint32_t prefix = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t candidate = prefix | (1U << bit);
    uint32_t count = 0;
    for (int64_t c = lane; c < n; c += 32) {
      count += ordered_key(s_at(c)) >= candidate;
    }
    if (static_cast<int64_t>(warp_sum(count)) >= k) {
      prefix = candidate;
    }
  }
  return from_ordered_key(prefix);
}

// One warp per row: top-k threshold, max and (first) argmax of S, softmax normalizer.
template <class scalar_t>
__global__ void __launch_bounds__(kStatsWarps * 32)
    token_mix_stats_kernel(const scalar_t* __restrict__ z, RowStats* __restrict__ stats, int64_t rows, int64_t n,
                           Options o) {
  const int lane = threadIdx.x % 32;
  const int64_t r = blockIdx.x * int64_t{kStatsWarps} + threadIdx.x / 32;
  if (r >= rows) {
    return;  // the whole warp
  }
  const scalar_t* zr = z + r * n;
  const float tau = static_cast<float>(o.tau);
  const uint32_t key = o.gumbel ? row_key(o, static_cast<uint32_t>(r)) : 0;
  auto s_at = [&](int64_t c) { return logit<float>(to_float(zr[c]), o, tau, key, static_cast<uint32_t>(c)); };
  const float threshold = o.topk > 0 ? kth_largest(s_at, n, o.topk, lane) : -INFINITY;
  float best = -INFINITY;
  uint32_t arg = kNoArgmax;
  for (int64_t c = lane; c < n; c += 32) {
    const float s = s_at(c);
    if (s > best) {
      best = s;
      arg = static_cast<uint32_t>(c);
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(0xffffffffU, best, offset);
    const uint32_t other_arg = __shfl_xor_sync(0xffffffffU, arg, offset);
    if (other > best || (other == best && other_arg < arg)) {
      best = other;
      arg = other_arg;
    }
  }
  float sum = 0.f;
  if (!o.sigmoid) {
    for (int64_t c = lane; c < n; c += 32) {
      const float s = s_at(c);
      sum += s >= threshold ? expf(s - best) : 0.f;
    }
    sum = warp_sum(sum);
  }
  if (lane == 0) {
    stats[r] = RowStats{best, 1.f / sum, threshold, arg, key};
  }
}

// A[r, c]: the soft weight (softmax or sigmoid of S, 0 outside the top k).
template <class scalar_t>
__device__ __forceinline__ float soft_weight(const scalar_t* z, const RowStats& st, int64_t r, int64_t c, int64_t n,
                                             const Options& o, float tau) {
  const float s = logit<float>(to_float(z[r * n + c]), o, tau, st.key, static_cast<uint32_t>(c));
  if (s < st.threshold) {
    return 0.f;
  }
  return o.sigmoid ? 1.f / (1.f + expf(-s)) : expf(s - st.max) * st.inv_sum;
}

// A_fwd[r, c]: the weight the forward uses (one-hot of the argmax in hard mode).
template <class scalar_t>
__device__ __forceinline__ float forward_weight(const scalar_t* z, const RowStats& st, int64_t r, int64_t c,
                                                int64_t n, const Options& o, float tau) {
  if (o.hard) {
    return static_cast<uint32_t>(c) == st.argmax ? 1.f : 0.f;
  }
  return soft_weight(z, st, r, c, n, o, tau);
}

// ----------------------------------------------------------------------------- tile engine

// Shared memory of one tile: row-major operands in the math type, the float result. The padding keeps
// WMMA's requirements (ldm a multiple of 8 for 16-bit types, tiles 32-byte aligned) and spreads banks.
template <class math_t, int BM, int BN, int BK>
struct TileSmem {
  static constexpr int kPad = sizeof(math_t) == 2 ? 8 : 4;
  static constexpr int kLdl = BK + kPad, kLdr = BN + kPad, kLdo = BN + 4;
  alignas(32) math_t lhs[BM][kLdl];
  alignas(32) math_t rhs[BK][kLdr];
  alignas(32) float out[BM][kLdo];
};

// float32: each thread accumulates TM x TN outputs (rows ty*TM + i, columns tx + j*TX) with FMAs.
template <int BM, int BN>
struct SimtAccumulator {
  static constexpr int TN = 4, TX = BN / TN, TM = BM * BN / kThreads / TN;
  static_assert(TX * (BM / TM) == kThreads, "the micro-tiles must cover the tile with kThreads threads");
  float c[TM][TN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        c[i][j] = 0.f;
      }
    }
  }

  template <class Smem>
  __device__ __forceinline__ void multiply(const Smem& sm, int bk) {
    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
#pragma unroll 8
    for (int k = 0; k < bk; ++k) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        a[i] = sm.lhs[ty * TM + i][k];
      }
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        b[j] = sm.rhs[k][tx + j * TX];
      }
#pragma unroll
      for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          c[i][j] = fmaf(a[i], b[j], c[i][j]);
        }
      }
    }
  }

  template <class Smem>
  __device__ __forceinline__ void store(Smem& sm) const {
    const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        sm.out[ty * TM + i][tx + j * TX] = c[i][j];
      }
    }
  }
};

// bfloat16 / float16: each warp owns kPerWarp 16 x 16 output tiles, WMMA with float accumulation.
template <class math_t, int BM, int BN>
struct WmmaAccumulator {
  static constexpr int kTilesN = BN / 16, kPerWarp = BM / 16 * kTilesN / kWarps;
  static_assert(kPerWarp * kWarps == BM / 16 * kTilesN, "the 16 x 16 tiles must split evenly over the warps");
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[kPerWarp];

  __device__ __forceinline__ static int tile(int q) { return threadIdx.x / 32 * kPerWarp + q; }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int q = 0; q < kPerWarp; ++q) {
      nvcuda::wmma::fill_fragment(c[q], 0.f);
    }
  }

  template <class Smem>
  __device__ __forceinline__ void multiply(const Smem& sm, int bk) {
    using namespace nvcuda;
    for (int k = 0; k < bk; k += 16) {
#pragma unroll
      for (int q = 0; q < kPerWarp; ++q) {
        const int tm = tile(q) / kTilesN, tn = tile(q) % kTilesN;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, math_t, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, math_t, wmma::row_major> b;
        wmma::load_matrix_sync(a, &sm.lhs[tm * 16][k], Smem::kLdl);
        wmma::load_matrix_sync(b, &sm.rhs[k][tn * 16], Smem::kLdr);
        wmma::mma_sync(c[q], a, b, c[q]);
      }
    }
  }

  template <class Smem>
  __device__ __forceinline__ void store(Smem& sm) const {
#pragma unroll
    for (int q = 0; q < kPerWarp; ++q) {
      const int tm = tile(q) / kTilesN, tn = tile(q) % kTilesN;
      nvcuda::wmma::store_matrix_sync(&sm.out[tm * 16][tn * 16], c[q], Smem::kLdo, nvcuda::wmma::mem_row_major);
    }
  }
};

template <class math_t, int BM, int BN>
using Accumulator = std::conditional_t<std::is_same_v<math_t, float>, SimtAccumulator<BM, BN>,
                                       WmmaAccumulator<math_t, BM, BN>>;

// sm.out = L @ R over k in [k_begin, k_end), L(row, k) = load_l(row, k) and R(k, col) = load_r(k, col)
// (floats; the loaders return 0 outside their matrix, the engine zero-fills k >= k_end). The operand
// tiles are filled with row- or k-fastest thread order so that global reads coalesce. Every thread
// of the block calls it; sm.out is complete (and readable by all threads) on return.
template <bool kLhsRowFastest, bool kRhsColFastest, class math_t, int BM, int BN, int BK, class LoadL, class LoadR>
__device__ __forceinline__ void gemm_tile(TileSmem<math_t, BM, BN, BK>& sm, int64_t k_begin, int64_t k_end,
                                          LoadL load_l, LoadR load_r) {
  static_assert(BK % 16 == 0, "BK must be a multiple of the WMMA depth");
  Accumulator<math_t, BM, BN> acc;
  acc.zero();
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    __syncthreads();  // every thread is done reading the previous operand tiles
    for (int e = threadIdx.x; e < BM * BK; e += kThreads) {
      const int row = kLhsRowFastest ? e % BM : e / BK, k = kLhsRowFastest ? e / BM : e % BK;
      sm.lhs[row][k] = from_float<math_t>(k0 + k < k_end ? load_l(row, k0 + k) : 0.f);
    }
    for (int e = threadIdx.x; e < BK * BN; e += kThreads) {
      const int col = kRhsColFastest ? e % BN : e / BK, k = kRhsColFastest ? e / BN : e % BK;
      sm.rhs[k][col] = from_float<math_t>(k0 + k < k_end ? load_r(k0 + k, col) : 0.f);
    }
    __syncthreads();
    acc.multiply(sm, BK);
  }
  __syncthreads();  // every thread is done reading sm.out of a previous call
  acc.store(sm);
  __syncthreads();
}

// ----------------------------------------------------------------------------- product kernels

// P tile (kTile rows of B*M, kTile columns of d) = A_fwd @ T, over all N.
template <class scalar_t, class math_t>
__global__ void __launch_bounds__(kThreads, 1)
    token_mix_forward_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ t,
                             const RowStats* __restrict__ stats, scalar_t* __restrict__ p, int64_t rows, int64_t n,
                             int64_t d, Options o) {
  __shared__ TileSmem<math_t, kTile, kTile, kTileK> sm;
  const int64_t r0 = blockIdx.x * int64_t{kTile}, j0 = blockIdx.y * int64_t{kTile};
  const float tau = static_cast<float>(o.tau);
  auto weight = [&](int row, int64_t c) {
    const int64_t r = r0 + row;
    return r < rows ? forward_weight(z, stats[r], r, c, n, o, tau) : 0.f;
  };
  auto library = [&](int64_t c, int col) { return j0 + col < d ? to_float(t[c * d + j0 + col]) : 0.f; };
  gemm_tile<false, true>(sm, 0, n, weight, library);
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int64_t r = r0 + e / kTile, j = j0 + e % kTile;
    if (r < rows && j < d) {
      p[r * d + j] = from_float<scalar_t>(sm.out[e / kTile][e % kTile]);
    }
  }
}

// dZ for kGradRows rows over all N. The softmax needs delta = rowsum(A dA) before any dZ: the first
// sweep stores dA in dZ (its own output, no extra tensor) and sums delta per row in the owning warp;
// the second sweep rewrites each entry as A (dA - delta) / tau. Both sweeps give entry (row, col) of a
// tile to the same thread (warp = row / kRowsPerWarp, lane = col % 32), so the read-back needs no fence.
// In 16-bit dtypes the stashed dA is rounded to that dtype, as eager PyTorch's dA would be.
template <class scalar_t, class math_t>
__global__ void __launch_bounds__(kThreads, 1)
    token_mix_grad_logits_kernel(const scalar_t* __restrict__ dp, const scalar_t* __restrict__ z,
                                 const scalar_t* __restrict__ t, const RowStats* __restrict__ stats,
                                 scalar_t* __restrict__ dz, int64_t rows, int64_t n, int64_t d, Options o) {
  constexpr int kRowsPerWarp = kGradRows / kWarps;
  __shared__ TileSmem<math_t, kGradRows, kTile, kTileK> sm;
  const int64_t r0 = blockIdx.x * int64_t{kGradRows};
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float tau = static_cast<float>(o.tau);
  float delta[kRowsPerWarp] = {};
  auto grad_out = [&](int row, int64_t j) { return r0 + row < rows ? to_float(dp[(r0 + row) * d + j]) : 0.f; };
  for (int64_t c0 = 0; c0 < n; c0 += kTile) {
    auto library_t = [&](int64_t j, int col) { return c0 + col < n ? to_float(t[(c0 + col) * d + j]) : 0.f; };
    gemm_tile<false, false>(sm, 0, d, grad_out, library_t);  // sm.out = dA[r0 + row, c0 + col]
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int row = warp * kRowsPerWarp + i;
      const int64_t r = r0 + row;
      float part = 0.f;
      for (int col = lane; col < kTile; col += 32) {
        const int64_t c = c0 + col;
        if (r < rows && c < n) {
          const float a = soft_weight(z, stats[r], r, c, n, o, tau), da = sm.out[row][col];
          part += a * da;
          dz[r * n + c] = from_float<scalar_t>(o.sigmoid ? a * (1.f - a) * da / tau : da);
        }
      }
      delta[i] += warp_sum(part);
    }
  }
  if (o.sigmoid) {
    return;
  }
  for (int64_t c0 = 0; c0 < n; c0 += kTile) {
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t r = r0 + warp * kRowsPerWarp + i;
      for (int col = lane; col < kTile; col += 32) {
        const int64_t c = c0 + col;
        if (r < rows && c < n) {
          const float a = soft_weight(z, stats[r], r, c, n, o, tau), da = to_float(dz[r * n + c]);
          dz[r * n + c] = from_float<scalar_t>(a * (da - delta[i]) / tau);
        }
      }
    }
  }
}

// partial[split] tile (kTile library rows, kTile columns of d) = A_fwd^T @ dP over this split's rows.
template <class scalar_t, class math_t>
__global__ void __launch_bounds__(kThreads, 1)
    token_mix_grad_library_kernel(const scalar_t* __restrict__ dp, const scalar_t* __restrict__ z,
                                  const RowStats* __restrict__ stats, float* __restrict__ partial, int64_t rows,
                                  int64_t n, int64_t d, int64_t rows_per_split, Options o) {
  __shared__ TileSmem<math_t, kTile, kTile, kTileK> sm;
  const int64_t c0 = blockIdx.x * int64_t{kTile}, j0 = blockIdx.y * int64_t{kTile};
  const int64_t r_begin = blockIdx.z * rows_per_split;
  const int64_t r_end = r_begin + rows_per_split < rows ? r_begin + rows_per_split : rows;
  const float tau = static_cast<float>(o.tau);
  auto weight_t = [&](int row, int64_t r) {
    return c0 + row < n ? forward_weight(z, stats[r], r, c0 + row, n, o, tau) : 0.f;
  };
  auto grad_out = [&](int64_t r, int col) { return j0 + col < d ? to_float(dp[r * d + j0 + col]) : 0.f; };
  gemm_tile<true, true>(sm, r_begin, r_end, weight_t, grad_out);
  float* out = partial + blockIdx.z * n * d;
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int64_t c = c0 + e / kTile, j = j0 + e % kTile;
    if (c < n && j < d) {
      out[c * d + j] = sm.out[e / kTile][e % kTile];
    }
  }
}

// ----------------------------------------------------------------------------- launch sequences

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Splits of the B*M rows for the library gradient: about two blocks per SM, at least 256 rows each.
inline int64_t grad_library_splits(int64_t rows, int64_t n, int64_t d, int sm_count) {
  const int64_t tiles = ceil_div(n, kTile) * ceil_div(d, kTile);
  const int64_t wanted = ceil_div(2 * int64_t{sm_count}, tiles), most = ceil_div(rows, 256);
  return wanted < 1 ? 1 : (wanted < most ? wanted : most);
}

// `launch(kernel, grid, block, args...)` runs one kernel; `stats` holds `rows` RowStats.
template <class scalar_t, class math_t, class Launch>
void forward_launches(Launch&& launch, const scalar_t* z, const scalar_t* t, RowStats* stats, scalar_t* p,
                      int64_t rows, int64_t n, int64_t d, const Options& o) {
  launch(token_mix_stats_kernel<scalar_t>, dim3(ceil_div(rows, kStatsWarps)), dim3(kStatsWarps * 32), z, stats, rows,
         n, o);
  launch(token_mix_forward_kernel<scalar_t, math_t>, dim3(ceil_div(rows, kTile), ceil_div(d, kTile)), dim3(kThreads),
         z, t, static_cast<const RowStats*>(stats), p, rows, n, d, o);
}

// Fills dz and partial (splits x n x d float32); the caller sums partial over splits into dT.
template <class scalar_t, class math_t, class Launch>
void backward_launches(Launch&& launch, const scalar_t* dp, const scalar_t* z, const scalar_t* t, RowStats* stats,
                       scalar_t* dz, float* partial, int64_t splits, int64_t rows, int64_t n, int64_t d,
                       const Options& o) {
  launch(token_mix_stats_kernel<scalar_t>, dim3(ceil_div(rows, kStatsWarps)), dim3(kStatsWarps * 32), z, stats, rows,
         n, o);
  const RowStats* row_stats = stats;
  launch(token_mix_grad_logits_kernel<scalar_t, math_t>, dim3(ceil_div(rows, kGradRows)), dim3(kThreads), dp, z, t,
         row_stats, dz, rows, n, d, o);
  launch(token_mix_grad_library_kernel<scalar_t, math_t>,
         dim3(ceil_div(n, kTile), ceil_div(d, kTile), splits), dim3(kThreads), dp, z, row_stats, partial, rows, n, d,
         ceil_div(rows, splits), o);
}

}  // namespace vpfast::token_mix

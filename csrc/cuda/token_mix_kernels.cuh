// CUDA kernels of vpfast::token_mix and vpfast::token_mix_backward (contract: csrc/token_mix.h).
//
// The three products are plain GEMMs, handed to aten::mm (aten_gemm.h: cuBLAS with torch's handle,
// stream, workspace and math settings; tensor cores for bfloat16/float16, float32 accumulation). The kernels here do the row-wise work around them, one warp per row
// r = b * M + m of S:
//
//   weights          the row's statistics (max and first argmax of S, softmax normalizer, top-k
//                    threshold, hash key) into a B*M buffer, and the row of the forward weights
//                    A_fwd (onehot(argmax S) in hard mode, else A) in the input dtype
//   grad_logits      dZ = dS / tau in place over dA: dS = A (dA - rowsum(A dA)) for softmax,
//                    A (1 - A) dA for sigmoid, with A the soft weights (straight-through in hard mode)
//
//   forward          P = A_fwd @ T, A_fwd written in row chunks of at most kWorkspaceWeights entries
//   backward         dZ's own storage holds A_fwd for dT = A_fwd^T @ dP, is overwritten by
//                    dA = dP @ T^T (rounded to the input dtype, as eager's dA), then by dZ
//
// So no B x M x N tensor is allocated besides dZ itself: the forward's workspace is bounded whatever
// B, and the backward recomputes A from Z and the row statistics, as FlashAttention recomputes its
// attention weights from the logsumexp.
//
// The launch sequences (forward_launches, backward_launches) take `launch` and `gemm` callbacks, so
// the same sequence runs from the torch launcher (token_mix.cu) and from the CPU emulation used in
// the tests (token_mix_emulation.cpp).

#pragma once

#ifdef __CUDACC__  // else the includer provides these (the CPU emulation does)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstdint>

#include "../token_mix.h"
#include "aten_gemm.h"

namespace vpfast::token_mix {

constexpr int kRowWarps = 4;  // rows per block of the row kernels (one warp per row)
constexpr uint32_t kNoArgmax = 0xffffffffU;
// The forward's workspace: at most this many weights (8 MiB in bfloat16, 16 MiB in float32) are in
// memory at once, whatever B: one chunk, so one weights kernel and one GEMM, up to B*M*N = 2^22
// (PGN's B=256, M=16, N=1024).
constexpr int64_t kWorkspaceWeights = int64_t{1} << 22;

// What the weights kernel leaves for each row r = b * M + m.
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

// A[r, c] of the row zr = Z[r]: the soft weight (softmax or sigmoid of S, 0 outside the top k).
template <class scalar_t>
__device__ __forceinline__ float soft_weight(const scalar_t* zr, const RowStats& st, int64_t c, const Options& o,
                                             float tau) {
  const float s = logit<float>(to_float(zr[c]), o, tau, st.key, static_cast<uint32_t>(c));
  if (s < st.threshold) {
    return 0.f;
  }
  return o.sigmoid ? 1.f / (1.f + expf(-s)) : expf(s - st.max) * st.inv_sum;
}

// sum * exp(from - to) for a sum of exp(s - from), to >= from; 0 for an empty sum (from may be -inf).
__device__ __forceinline__ float rescaled(float sum, float from, float to) {
  return sum == 0.f ? 0.f : sum * expf(from - to);
}

// Rows [r_begin, r_end): statistics into stats[r] (unless stats is null: the forward needs none), the
// forward weights A_fwd[r] into w[r - r_begin].
template <class scalar_t>
__global__ void __launch_bounds__(kRowWarps * 32)
    token_mix_weights_kernel(const scalar_t* __restrict__ z, RowStats* __restrict__ stats, scalar_t* __restrict__ w,
                             int64_t r_begin, int64_t r_end, int64_t n, Options o) {
  const int lane = threadIdx.x % 32;
  const int64_t r = r_begin + blockIdx.x * int64_t{kRowWarps} + threadIdx.x / 32;
  if (r >= r_end) {
    return;  // the whole warp
  }
  const scalar_t* zr = z + r * n;
  const float tau = static_cast<float>(o.tau);
  const uint32_t key = o.gumbel ? row_key(o, static_cast<uint32_t>(r)) : 0;
  auto s_at = [&](int64_t c) { return logit<float>(to_float(zr[c]), o, tau, key, static_cast<uint32_t>(c)); };
  const float threshold = o.topk > 0 ? kth_largest(s_at, n, o.topk, lane) : -INFINITY;
  // One pass for max, first argmax and the softmax normalizer, rescaled as the max grows (online
  // softmax); then the lanes merge theirs.
  float best = -INFINITY, sum = 0.f;
  uint32_t arg = kNoArgmax;
  for (int64_t c = lane; c < n; c += 32) {
    const float s = s_at(c);
    if (s > best) {
      sum = rescaled(sum, best, s);
      best = s;
      arg = static_cast<uint32_t>(c);
    }
    if (!o.sigmoid && s >= threshold && s != -INFINITY) {
      sum += expf(s - best);
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(0xffffffffU, best, offset);
    const uint32_t other_arg = __shfl_xor_sync(0xffffffffU, arg, offset);
    const float other_sum = __shfl_xor_sync(0xffffffffU, sum, offset);
    const float merged = other > best ? other : best;
    sum = rescaled(sum, best, merged) + rescaled(other_sum, other, merged);
    if (other > best || (other == best && other_arg < arg)) {
      arg = other_arg;
    }
    best = merged;
  }
  const RowStats st{best, 1.f / sum, threshold, arg, key};
  if (lane == 0 && stats != nullptr) {
    stats[r] = st;
  }
  scalar_t* wr = w + (r - r_begin) * n;
  for (int64_t c = lane; c < n; c += 32) {
    const float a = o.hard ? (static_cast<uint32_t>(c) == arg ? 1.f : 0.f) : soft_weight(zr, st, c, o, tau);
    wr[c] = from_float<scalar_t>(a);
  }
}

// dz holds dA on entry and dZ on return. The softmax needs delta = rowsum(A dA) before any dZ, so it
// reads the row twice; each entry is read and rewritten by the same lane.
template <class scalar_t>
__global__ void __launch_bounds__(kRowWarps * 32)
    token_mix_grad_logits_kernel(const scalar_t* __restrict__ z, const RowStats* __restrict__ stats,
                                 scalar_t* __restrict__ dz, int64_t rows, int64_t n, Options o) {
  const int lane = threadIdx.x % 32;
  const int64_t r = blockIdx.x * int64_t{kRowWarps} + threadIdx.x / 32;
  if (r >= rows) {
    return;
  }
  const scalar_t* zr = z + r * n;
  scalar_t* dzr = dz + r * n;
  const RowStats st = stats[r];
  const float tau = static_cast<float>(o.tau);
  if (o.sigmoid) {
    for (int64_t c = lane; c < n; c += 32) {
      const float a = soft_weight(zr, st, c, o, tau);
      dzr[c] = from_float<scalar_t>(a * (1.f - a) * to_float(dzr[c]) / tau);
    }
    return;
  }
  float part = 0.f;
  for (int64_t c = lane; c < n; c += 32) {
    part += soft_weight(zr, st, c, o, tau) * to_float(dzr[c]);
  }
  const float delta = warp_sum(part);
  for (int64_t c = lane; c < n; c += 32) {
    const float a = soft_weight(zr, st, c, o, tau);
    dzr[c] = from_float<scalar_t>(a * (to_float(dzr[c]) - delta) / tau);
  }
}

// ----------------------------------------------------------------------------- launch sequences

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows of A_fwd per forward chunk: as many as fit in kWorkspaceWeights, at least one.
inline int64_t weight_chunk_rows(int64_t rows, int64_t n) {
  const int64_t fit = kWorkspaceWeights / n;
  return fit < 1 ? 1 : (fit < rows ? fit : rows);
}

// `launch(kernel, grid, block, args...)` runs one kernel, `gemm(c, a, b)` computes c = a @ b.
// `workspace` holds chunk_rows x n weights: ceil(rows / chunk_rows) x (one weights kernel + one GEMM).
template <class scalar_t, class Launch, class Gemm>
void forward_launches(Launch&& launch, Gemm&& gemm, const scalar_t* z, const scalar_t* t, scalar_t* workspace, int64_t chunk_rows, scalar_t* p, int64_t rows, int64_t n, int64_t d,
                      const Options& o) {
  for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
    const int64_t count = chunk_rows < rows - r0 ? chunk_rows : rows - r0;
    launch(token_mix_weights_kernel<scalar_t>, dim3(ceil_div(count, kRowWarps)), dim3(kRowWarps * 32), z,
           static_cast<RowStats*>(nullptr), workspace, r0, r0 + count, n, o);
    gemm(MatrixView<scalar_t>{p + r0 * d, count, d, d, 1}, MatrixView<const scalar_t>{workspace, count, n, n, 1},
         MatrixView<const scalar_t>{t, n, d, d, 1});
  }
}

// Fills dz (rows x n) and dt (n x d): two row kernels and two GEMMs. `stats` holds `rows` RowStats.
template <class scalar_t, class Launch, class Gemm>
void backward_launches(Launch&& launch, Gemm&& gemm, const scalar_t* dp, const scalar_t* z, const scalar_t* t,
                       RowStats* stats, scalar_t* dz, scalar_t* dt, int64_t rows, int64_t n, int64_t d,
                       const Options& o) {
  const dim3 grid(ceil_div(rows, kRowWarps)), block(kRowWarps * 32);
  launch(token_mix_weights_kernel<scalar_t>, grid, block, z, stats, dz, int64_t{0}, rows, n, o);
  const MatrixView<const scalar_t> grad_out{dp, rows, d, d, 1};
  gemm(MatrixView<scalar_t>{dt, n, d, d, 1}, MatrixView<const scalar_t>{dz, n, rows, 1, n}, grad_out);
  gemm(MatrixView<scalar_t>{dz, rows, n, n, 1}, grad_out, MatrixView<const scalar_t>{t, d, n, 1, d});
  launch(token_mix_grad_logits_kernel<scalar_t>, grid, block, z, static_cast<const RowStats*>(stats), dz, rows, n,
         o);
}

}  // namespace vpfast::token_mix

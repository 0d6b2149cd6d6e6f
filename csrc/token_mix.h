// vpfast::token_mix, PGN token-library soft sampling: definitions shared by the CPU kernels
// (csrc/token_mix.cpp) and the CUDA kernels (csrc/cuda/token_mix*.cu).
//
// Contract (docs/ops.md, "token_mix"): S = (Z + G) / tau, top-k keeps the entries >= the k-th largest
// of each row of S (ties at the k-th value are all kept), A = softmax(S) over N or sigmoid(S),
// hard mode replaces A by onehot(argmax S) in the forward only (straight-through), P = A @ T.
//
// The Gumbel noise G is a counter-based hash of (seed, row, column), so the forward and the
// backward, the CPU and CUDA kernels and the PyTorch reference (vpfast/ops/token_mix.py, integer
// tensor ops) all draw the same noise without storing it.

#pragma once

#include <torch/csrc/stable/tensor.h>

#include <cmath>
#include <cstdint>
#include <string>

#ifdef __CUDACC__
#define VPFAST_HD __host__ __device__ __forceinline__
#else
#define VPFAST_HD inline
#endif

namespace vpfast::token_mix {

// The scalar options of one call, as kernels take them (the op schema's floats, ints and strings).
struct Options {
  double tau;        // temperature, > 0 (not learnable: the op returns no gradient for it)
  int64_t topk;      // keep the topk largest logits of each row; 0 (or >= N) keeps all
  uint32_t seed_lo;  // the 64-bit seed's halves; used only with gumbel
  uint32_t seed_hi;
  bool gumbel;
  bool hard;
  bool sigmoid;  // activation: sigmoid (no row normalization) instead of softmax
};

// Wellons' "lowbias32" 32-bit integer finalizer: a bijection with near-ideal avalanche.
VPFAST_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// The per-row half of the hash: mix32(mix32(mix32(seed_lo) ^ seed_hi) ^ row).
VPFAST_HD uint32_t row_key(const Options& o, uint32_t row) {
  return mix32(mix32(mix32(o.seed_lo) ^ o.seed_hi) ^ row);
}

VPFAST_HD float natural_log(float x) { return logf(x); }
VPFAST_HD double natural_log(double x) { return log(x); }

// Gumbel noise -log(-log(u)) with u = ((h >> 9) + 0.5) / 2^23, h = mix32(row_key ^ col): u lies in
// (0, 1) and is exact in float32 and float64, so only the logarithms may differ between backends.
template <class T>
VPFAST_HD T gumbel_noise(uint32_t key, uint32_t col) {
  const uint32_t h = mix32(key ^ col);
  const T u = (static_cast<T>(h >> 9) + static_cast<T>(0.5)) * static_cast<T>(1.0 / 8388608.0);
  return -natural_log(-natural_log(u));
}

// One entry of S, in the order the reference computes it: (z + g) / tau.
template <class T>
VPFAST_HD T logit(T z, const Options& o, T tau, uint32_t key, uint32_t col) {
  if (o.gumbel) {
    z += gumbel_noise<T>(key, col);
  }
  return z / tau;
}

// The argument checks of both ops (csrc/token_mix.cpp), shared by the CPU and CUDA kernels: they raise
// with the argument's name, what was expected and what was given, and return the kernels' options.
Options checked_options(const torch::stable::Tensor& logits, const torch::stable::Tensor& library, double tau,
                        bool gumbel, int64_t seed, int64_t topk, bool hard, const std::string& activation);
void check_grad(const torch::stable::Tensor& grad, const torch::stable::Tensor& logits,
                const torch::stable::Tensor& library);

}  // namespace vpfast::token_mix

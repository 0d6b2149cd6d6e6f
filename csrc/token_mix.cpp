// vpfast::token_mix and vpfast::token_mix_backward on CPU tensors, plus the argument checks that the
// CUDA kernels share (contract: csrc/token_mix.h and DESIGN.md "token_mix").
//
// Rows (b, m) are independent, so both passes run in parallel over rows with
// torch::stable::parallel_for (at::parallel_for behind the stable ABI, torch >= 2.10). Each row keeps
// its N logits and weights in a row-local buffer; the library gradient, a reduction over rows, reads
// the weights from an R x N scratch buffer filled by the row pass (CPU memory is not the constraint
// here; the CUDA kernels recompute the weights instead).
//
// Accumulation is in float for float32/bfloat16/float16 and in double for float64.

#include "token_mix.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace vpfast::token_mix {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

namespace {

bool supported_dtype(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::BFloat16 || t == ScalarType::Half;
}

}  // namespace

Options checked_options(const Tensor& logits, const Tensor& library, double tau, bool gumbel, int64_t seed,
                        int64_t topk, bool hard, const std::string& activation) {
  STD_TORCH_CHECK(logits.dim() == 3, "vpfast::token_mix: logits must be 3-d (B, M, N), got ", logits.dim(),
                  " dimensions");
  STD_TORCH_CHECK(library.dim() == 2 && library.size(0) == logits.size(2),
                  "vpfast::token_mix: library must have shape (N, d) with N = ", logits.size(2),
                  " (the logits' last dimension)");
  STD_TORCH_CHECK(supported_dtype(logits.scalar_type()),
                  "vpfast::token_mix: logits must be float32, float64, bfloat16 or float16, got ",
                  torch::headeronly::toString(logits.scalar_type()));
  STD_TORCH_CHECK(library.scalar_type() == logits.scalar_type(), "vpfast::token_mix: library dtype ",
                  torch::headeronly::toString(library.scalar_type()), " differs from the logits' ",
                  torch::headeronly::toString(logits.scalar_type()));
  STD_TORCH_CHECK(library.device() == logits.device(),
                  "vpfast::token_mix: library and logits must be on the same device");
  STD_TORCH_CHECK(tau > 0 && std::isfinite(tau), "vpfast::token_mix: tau must be a finite number > 0, got ", tau);
  STD_TORCH_CHECK(topk >= 0 && topk <= logits.size(2), "vpfast::token_mix: topk must be in [0, N = ",
                  logits.size(2), "] (0 keeps all), got ", topk);
  STD_TORCH_CHECK(activation == "softmax" || activation == "sigmoid",
                  "vpfast::token_mix: activation must be 'softmax' or 'sigmoid', got '", activation, "'");
  STD_TORCH_CHECK(seed >= 0, "vpfast::token_mix: seed must be >= 0, got ", seed);
  constexpr int64_t kMaxIndex = int64_t{1} << 32;  // rows and columns are hashed as 32-bit counters
  STD_TORCH_CHECK(logits.size(0) * logits.size(1) < kMaxIndex && logits.size(2) < kMaxIndex,
                  "vpfast::token_mix: B * M and N must be < 2^32");
  const bool keep_all = topk == 0 || topk >= logits.size(2);
  return Options{tau,
                 keep_all ? 0 : topk,
                 static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffU),
                 static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32),
                 gumbel,
                 hard,
                 activation == "sigmoid"};
}

void check_grad(const Tensor& grad, const Tensor& logits, const Tensor& library) {
  STD_TORCH_CHECK(grad.dim() == 3 && grad.size(0) == logits.size(0) && grad.size(1) == logits.size(1) &&
                      grad.size(2) == library.size(1),
                  "vpfast::token_mix_backward: grad must have shape (B, M, d) = (", logits.size(0), ", ",
                  logits.size(1), ", ", library.size(1), ")");
  STD_TORCH_CHECK(grad.scalar_type() == logits.scalar_type() && grad.device() == logits.device(),
                  "vpfast::token_mix_backward: grad must have the logits' dtype and device");
}

namespace {

// One row's logits S (masked to -inf outside the top k) and soft weights A; returns argmax S.
template <class scalar_t, class acc_t>
int64_t row_weights(const scalar_t* z, int64_t n, uint32_t row, const Options& o, acc_t* s, acc_t* a) {
  const acc_t tau = static_cast<acc_t>(o.tau);
  const uint32_t key = o.gumbel ? row_key(o, row) : 0;
  int64_t arg = 0;
  for (int64_t c = 0; c < n; ++c) {
    s[c] = logit<acc_t>(static_cast<acc_t>(z[c]), o, tau, key, static_cast<uint32_t>(c));
    if (s[c] > s[arg]) {
      arg = c;  // the first of equal maxima, as torch.argmax
    }
  }
  if (o.topk > 0) {
    std::copy(s, s + n, a);
    std::nth_element(a, a + o.topk - 1, a + n, std::greater<acc_t>());
    const acc_t kth = a[o.topk - 1];
    for (int64_t c = 0; c < n; ++c) {
      s[c] = s[c] < kth ? -std::numeric_limits<acc_t>::infinity() : s[c];
    }
  }
  if (o.sigmoid) {
    for (int64_t c = 0; c < n; ++c) {
      a[c] = acc_t(1) / (acc_t(1) + std::exp(-s[c]));
    }
    return arg;
  }
  const acc_t max = s[arg];
  acc_t sum = 0;
  for (int64_t c = 0; c < n; ++c) {
    a[c] = std::exp(s[c] - max);
    sum += a[c];
  }
  for (int64_t c = 0; c < n; ++c) {
    a[c] /= sum;
  }
  return arg;
}

template <class scalar_t, class acc_t>
void forward_rows(const scalar_t* z, const scalar_t* t, scalar_t* p, int64_t rows, int64_t n, int64_t d,
                  const Options& o) {
  torch::stable::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(n), a(n), out(d);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t arg = row_weights(z + r * n, n, static_cast<uint32_t>(r), o, s.data(), a.data());
      std::fill(out.begin(), out.end(), acc_t(0));
      for (int64_t c = 0; c < n; ++c) {
        const acc_t w = o.hard ? acc_t(c == arg) : a[c];
        const scalar_t* tc = t + c * d;
        for (int64_t j = 0; j < d; ++j) {
          out[j] += w * static_cast<acc_t>(tc[j]);
        }
      }
      for (int64_t j = 0; j < d; ++j) {
        p[r * d + j] = static_cast<scalar_t>(out[j]);
      }
    }
  });
}

// dZ row by row: dA = dP T^T, dS = A (dA - sum(A dA)) for softmax or A (1 - A) dA for sigmoid, dZ = dS / tau
// (A is the soft weight also in hard mode: straight-through). Stores the forward weights (one-hot in
// hard mode) in `w` for the library gradient dT = W^T dP, computed in parallel over library rows.
template <class scalar_t, class acc_t>
void backward_rows(const scalar_t* dp, const scalar_t* z, const scalar_t* t, scalar_t* dz, scalar_t* dt,
                   int64_t rows, int64_t n, int64_t d, const Options& o) {
  std::vector<acc_t> w(static_cast<size_t>(rows * n));
  const acc_t tau = static_cast<acc_t>(o.tau);
  torch::stable::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(n), a(n), da(n);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t arg = row_weights(z + r * n, n, static_cast<uint32_t>(r), o, s.data(), a.data());
      const scalar_t* dpr = dp + r * d;
      acc_t delta = 0;
      for (int64_t c = 0; c < n; ++c) {
        acc_t dot = 0;
        for (int64_t j = 0; j < d; ++j) {
          dot += static_cast<acc_t>(dpr[j]) * static_cast<acc_t>(t[c * d + j]);
        }
        da[c] = dot;
        delta += a[c] * dot;
      }
      for (int64_t c = 0; c < n; ++c) {
        const acc_t ds = o.sigmoid ? a[c] * (acc_t(1) - a[c]) * da[c] : a[c] * (da[c] - delta);
        dz[r * n + c] = static_cast<scalar_t>(ds / tau);
        w[r * n + c] = o.hard ? acc_t(c == arg) : a[c];
      }
    }
  });
  torch::stable::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> out(d);
    for (int64_t c = begin; c < end; ++c) {
      std::fill(out.begin(), out.end(), acc_t(0));
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t wr = w[r * n + c];
        for (int64_t j = 0; j < d; ++j) {
          out[j] += wr * static_cast<acc_t>(dp[r * d + j]);
        }
      }
      for (int64_t j = 0; j < d; ++j) {
        dt[c * d + j] = static_cast<scalar_t>(out[j]);
      }
    }
  });
}

// Calls f(scalar_t{}, acc_t{}) for the tensor's dtype (checked_options has validated it).
template <class F>
void dispatch_dtype(ScalarType dtype, F&& f) {
  switch (dtype) {
    case ScalarType::Double:
      return f(double{}, double{});
    case ScalarType::BFloat16:
      return f(torch::headeronly::BFloat16{}, float{});
    case ScalarType::Half:
      return f(torch::headeronly::Half{}, float{});
    default:
      return f(float{}, float{});
  }
}

Tensor token_mix_cpu(const Tensor& logits, const Tensor& library, double tau, bool gumbel, int64_t seed,
                     int64_t topk, bool hard, std::string activation) {
  const Options o = checked_options(logits, library, tau, gumbel, seed, topk, hard, activation);
  const Tensor z = torch::stable::contiguous(logits);
  const Tensor t = torch::stable::contiguous(library);
  const int64_t rows = z.size(0) * z.size(1), n = z.size(2), d = t.size(1);
  Tensor p = torch::stable::new_empty(z, {z.size(0), z.size(1), d});
  dispatch_dtype(z.scalar_type(), [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    forward_rows<scalar_t, decltype(acc)>(static_cast<const scalar_t*>(z.const_data_ptr()),
                                          static_cast<const scalar_t*>(t.const_data_ptr()),
                                          static_cast<scalar_t*>(p.mutable_data_ptr()), rows, n, d, o);
  });
  return p;
}

std::tuple<Tensor, Tensor> token_mix_backward_cpu(const Tensor& grad, const Tensor& logits, const Tensor& library,
                                                  double tau, bool gumbel, int64_t seed, int64_t topk, bool hard,
                                                  std::string activation) {
  const Options o = checked_options(logits, library, tau, gumbel, seed, topk, hard, activation);
  check_grad(grad, logits, library);
  const Tensor dp = torch::stable::contiguous(grad);
  const Tensor z = torch::stable::contiguous(logits);
  const Tensor t = torch::stable::contiguous(library);
  const int64_t rows = z.size(0) * z.size(1), n = z.size(2), d = t.size(1);
  Tensor dz = torch::stable::new_empty(z, {z.size(0), z.size(1), n});
  Tensor dt = torch::stable::new_empty(t, {n, d});
  dispatch_dtype(z.scalar_type(), [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    backward_rows<scalar_t, decltype(acc)>(
        static_cast<const scalar_t*>(dp.const_data_ptr()), static_cast<const scalar_t*>(z.const_data_ptr()),
        static_cast<const scalar_t*>(t.const_data_ptr()), static_cast<scalar_t*>(dz.mutable_data_ptr()),
        static_cast<scalar_t*>(dt.mutable_data_ptr()), rows, n, d, o);
  });
  return {dz, dt};
}

}  // namespace
}  // namespace vpfast::token_mix

STABLE_TORCH_LIBRARY_IMPL(vpfast, CPU, m) {
  m.impl("token_mix", TORCH_BOX(&vpfast::token_mix::token_mix_cpu));
  m.impl("token_mix_backward", TORCH_BOX(&vpfast::token_mix::token_mix_backward_cpu));
}

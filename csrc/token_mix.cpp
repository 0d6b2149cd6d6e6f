// The CPU kernels of vpfast::_ext_token_mix and vpfast::_ext_token_mix_backward (schemas in
// vpfast/ops/token_mix.py: the "cpp" backend of token_mix), plus the argument checks that the
// CUDA kernels share (contract: csrc/token_mix.h and docs/ops.md "token_mix").
//
// What ATen has no op for, S = (Z + G) / tau with the hashed Gumbel noise, the top-k mask (ties kept)
// and argmax, runs here in parallel over the B*M rows with torch::stable::parallel_for
// (at::parallel_for behind the stable ABI, torch >= 2.10). The rest are ATen ops called through the
// stable dispatcher, vectorized and parallel: softmax or sigmoid and their backward, and the three
// products (the CPU's BLAS):
//
//   forward    W = forward weights (rows x N): softmax(S), sigmoid(S) or onehot(argmax S); P = W @ T
//   backward   dA = dP @ T^T, dS from A and dA, dZ = dS / tau, dT = W^T @ dP
//
// W, S and dA are R x N buffers: CPU memory is not the constraint here (the CUDA path bounds its
// workspace instead, csrc/cuda/token_mix_kernels.cuh). Everything is computed in float for
// float32/bfloat16/float16 and in double for float64, and rounded once to the dtype.

#include "token_mix.h"

#include "aten_call.h"

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

// Every row's S into s (-inf outside the top k) and, in hard mode, argmax S into arg (the first of
// equal maxima, as torch.argmax): the part ATen has no op for (the hashed Gumbel noise, top-k keeping
// ties).
template <class scalar_t, class acc_t>
void logits_rows(const scalar_t* z, acc_t* s, int64_t* arg, int64_t rows, int64_t n, const Options& o) {
  const acc_t tau = static_cast<acc_t>(o.tau);
  torch::stable::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kept(o.topk > 0 ? n : 0);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* zr = z + r * n;
      acc_t* sr = s + r * n;
      const uint32_t key = o.gumbel ? row_key(o, static_cast<uint32_t>(r)) : 0;
      for (int64_t c = 0; c < n; ++c) {
        sr[c] = logit<acc_t>(static_cast<acc_t>(zr[c]), o, tau, key, static_cast<uint32_t>(c));
      }
      if (o.hard) {
        int64_t best = 0;
        acc_t best_value = sr[0];
        for (int64_t c = 1; c < n; ++c) {
          if (sr[c] > best_value) {
            best_value = sr[c];
            best = c;
          }
        }
        arg[r] = best;
      }
      if (o.topk > 0) {
        std::copy(sr, sr + n, kept.begin());
        std::nth_element(kept.begin(), kept.begin() + o.topk - 1, kept.end(), std::greater<acc_t>());
        const acc_t kth = kept[o.topk - 1];
        for (int64_t c = 0; c < n; ++c) {
          sr[c] = sr[c] < kth ? -std::numeric_limits<acc_t>::infinity() : sr[c];
        }
      }
    }
  });
}

// The soft weights A from S (rows x n): ATen's vectorized softmax over the last dimension, or sigmoid.
Tensor soft_weights(const Tensor& s, const Options& o) {
  return o.sigmoid ? call_aten("aten::sigmoid", "", s) : call_aten("aten::_softmax", "", s, int64_t{-1}, false);
}

// Rows of w set to onehot(arg): the forward weights of hard mode.
template <class acc_t>
void one_hot_rows(acc_t* w, const int64_t* arg, int64_t rows, int64_t n) {
  torch::stable::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::fill(w + begin * n, w + end * n, acc_t(0));
    for (int64_t r = begin; r < end; ++r) {
      w[r * n + arg[r]] = acc_t(1);
    }
  });
}

// dZ = dS / tau in the logits' dtype, element by element.
template <class scalar_t, class acc_t>
void scaled_to(const acc_t* ds, scalar_t* dz, int64_t count, double tau) {
  const acc_t t = static_cast<acc_t>(tau);
  torch::stable::parallel_for(0, count, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      dz[i] = static_cast<scalar_t>(ds[i] / t);
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

// The dtype the CPU path computes in: double for float64, else float.
ScalarType acc_dtype(ScalarType dtype) { return dtype == ScalarType::Double ? dtype : ScalarType::Float; }

Tensor with_dtype(const Tensor& x, ScalarType dtype) {
  return x.scalar_type() == dtype ? x : torch::stable::to(x, dtype);
}

Tensor token_mix_cpu(const Tensor& logits, const Tensor& library, double tau, bool gumbel, int64_t seed,
                     int64_t topk, bool hard, std::string activation) {
  const Options o = checked_options(logits, library, tau, gumbel, seed, topk, hard, activation);
  const Tensor z = torch::stable::contiguous(logits);
  const int64_t rows = z.size(0) * z.size(1), n = z.size(2), d = library.size(1);
  const ScalarType acc = acc_dtype(z.scalar_type());
  Tensor w = torch::stable::new_empty(z, {rows, n}, acc);
  std::vector<int64_t> arg(rows);
  dispatch_dtype(z.scalar_type(), [&](auto scalar, auto acc_value) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc_value);
    logits_rows(static_cast<const scalar_t*>(z.const_data_ptr()), static_cast<acc_t*>(w.mutable_data_ptr()),
                arg.data(), rows, n, o);
    if (o.hard) {
      one_hot_rows(static_cast<acc_t*>(w.mutable_data_ptr()), arg.data(), rows, n);
    }
  });
  if (!o.hard) {
    w = soft_weights(w, o);
  }
  const Tensor p = torch::stable::matmul(w, with_dtype(library, acc));
  const int64_t shape[] = {z.size(0), z.size(1), d};
  return with_dtype(torch::stable::reshape(p, torch::headeronly::IntHeaderOnlyArrayRef(shape, 3)), z.scalar_type());
}

// dA = dP @ T^T; dS = softmax or sigmoid backward of A (soft also in hard mode: straight-through);
// dZ = dS / tau; dT = W^T @ dP with W the forward weights.
std::tuple<Tensor, Tensor> token_mix_backward_cpu(const Tensor& grad, const Tensor& logits, const Tensor& library,
                                                  double tau, bool gumbel, int64_t seed, int64_t topk, bool hard,
                                                  std::string activation) {
  const Options o = checked_options(logits, library, tau, gumbel, seed, topk, hard, activation);
  check_grad(grad, logits, library);
  const Tensor z = torch::stable::contiguous(logits);
  const int64_t rows = z.size(0) * z.size(1), n = z.size(2), d = library.size(1);
  const ScalarType acc = acc_dtype(z.scalar_type());
  const int64_t grad_shape[] = {rows, d};
  const Tensor dp = with_dtype(torch::stable::reshape(grad, torch::headeronly::IntHeaderOnlyArrayRef(grad_shape, 2)),
                               acc);
  const Tensor da = torch::stable::matmul(dp, torch::stable::transpose(with_dtype(library, acc), 0, 1));
  Tensor s = torch::stable::new_empty(z, {rows, n}, acc);
  std::vector<int64_t> arg(rows);
  dispatch_dtype(z.scalar_type(), [&](auto scalar, auto acc_value) {
    using scalar_t = decltype(scalar);
    logits_rows(static_cast<const scalar_t*>(z.const_data_ptr()), static_cast<decltype(acc_value)*>(s.mutable_data_ptr()),
                arg.data(), rows, n, o);
  });
  Tensor w = soft_weights(s, o);
  const Tensor ds = torch::stable::contiguous(
      o.sigmoid ? call_aten("aten::sigmoid_backward", "", da, w)
                : call_aten("aten::_softmax_backward_data", "", da, w, int64_t{-1}, acc));
  Tensor dz = torch::stable::new_empty(z, {z.size(0), z.size(1), n});
  dispatch_dtype(z.scalar_type(), [&](auto scalar, auto acc_value) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc_value);
    scaled_to(static_cast<const acc_t*>(ds.const_data_ptr()), static_cast<scalar_t*>(dz.mutable_data_ptr()),
              rows * n, o.tau);
    if (o.hard) {
      one_hot_rows(static_cast<acc_t*>(w.mutable_data_ptr()), arg.data(), rows, n);
    }
  });
  const Tensor dt = torch::stable::matmul(torch::stable::transpose(w, 0, 1), dp);
  return {dz, with_dtype(dt, z.scalar_type())};
}

}  // namespace
}  // namespace vpfast::token_mix

STABLE_TORCH_LIBRARY_IMPL(vpfast, CPU, m) {
  m.impl("_ext_token_mix", TORCH_BOX(&vpfast::token_mix::token_mix_cpu));
  m.impl("_ext_token_mix_backward", TORCH_BOX(&vpfast::token_mix::token_mix_backward_cpu));
}

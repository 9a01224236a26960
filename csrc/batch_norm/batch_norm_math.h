// BatchNorm per-channel math, shared by the CPU loops and the CUDA kernels.
//
// Every elementwise pass of this family is one formula with per-channel coefficients:
//     out = p * a + (q - m) * b + d
// where p and/or q are present depending on the pass:
//     forward (train and eval):  q = x, m = mean, b = weight * invstd, d = bias          (no p)
//     backward, train:           p = dy, q = x, m = mean, a = weight * invstd,
//                                b = -a * invstd^2 * sum(dy (x - mean)) / n, d = -a * sum(dy) / n
//     backward, eval:            p = dy, a = weight * invstd                             (no q)
// Centering with (q - m) before scaling keeps full precision when |mean| >> std.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/convert.h"
#include "common/macros.h"

namespace modekernels::batch_norm {

// Coefficients are stored as a (4, C) opmath tensor: rows a, b, m, d.
enum CoeffRow : int64_t { kA = 0, kB = 1, kM = 2, kD = 3 };

// The forward's elementwise value before any residual or ReLU: d + (q - m) b. The backward of
// BatchNorm+ReLU recomputes it to find the ReLU's gate, so both must round it alike: on the GPU
// the multiply-add is fused explicitly; the CPU build has no FMA contraction (baseline ISA).
template <typename T>
MK_HOST_DEVICE T normalized(T q, T m, T b, T d) {
#ifdef __CUDA_ARCH__
  return fma(q - m, b, d);
#else
  return d + (q - m) * b;
#endif
}

// The largest T that rounds to zero as scalar_t, to nearest even: half the smallest positive
// subnormal of float16 (2^-24) or bfloat16 (2^-133), 0 where scalar_t is T itself. A value v is
// <= 0 once rounded to scalar_t iff v <= zero_rounding_bound (never for NaN).
template <typename scalar_t, typename T>
MK_HOST_DEVICE constexpr T zero_rounding_bound() {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return T(0x1p-25);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return T(0x1p-134);
  } else {
    return T(0);
  }
}

// Whether a ReLU's backward lets the gradient through where the ReLU's output is v: unless
// v <= 0, as torch's (threshold_backward), so a NaN output passes it. `above` is 0, or
// zero_rounding_bound for an output not yet rounded to its dtype.
template <typename T>
MK_HOST_DEVICE bool relu_passes(T v, T above = T(0)) {
  return !(v <= above);
}

// Whether the forward's ReLU passed element x with forward coefficients (m, b, d): relu_passes of
// its output, rounded to scalar_t as the forward stored it. One comparison, with no rounding, so
// that the loops that recompute the gate vectorize.
template <typename scalar_t, typename T>
MK_HOST_DEVICE bool relu_open(T x, T m, T b, T d) {
  return relu_passes(normalized(x, m, b, d), zero_rounding_bound<scalar_t, T>());
}

// A fused backward's ReLU gate (batch_norm.h Gate) as the kernels see it: g is null (no gate),
// the forward output (open where relu_passes), or, with coeffs (the forward's (4, C)
// coefficients), the input (open where relu_open).
template <typename scalar_t, typename T>
struct GateView {
  const scalar_t* g;
  const T* coeffs;
  int64_t C;

  // Whether channel c's gate value v (g's element, in T) lets dy through.
  MK_HOST_DEVICE bool passes(T v, int64_t c) const {
    return coeffs ? relu_open<scalar_t>(v, coeffs[kM * C + c], coeffs[kB * C + c], coeffs[kD * C + c])
                  : relu_passes(v);
  }
  MK_HOST_DEVICE bool open(int64_t i, int64_t c) const {
    return !g || passes(widen<T>(g[i]), c);
  }
};

template <typename T>
MK_HOST_DEVICE T invstd_of(T var, double eps) {
  return T(1) / static_cast<T>(sqrt(static_cast<double>(var) + eps));
}

// Forward coefficients for channel c; `weight`/`bias` may be null (affine=False, bias=False).
template <typename T, typename P>
MK_HOST_DEVICE void forward_coeffs(int64_t c, int64_t C, const T* mean, const T* var,
                                   const P* weight, const P* bias, double eps, T* coeffs) {
  const T invstd = invstd_of(var[c], eps);
  coeffs[kA * C + c] = T(0);
  coeffs[kB * C + c] = weight ? static_cast<T>(weight[c]) * invstd : invstd;
  coeffs[kM * C + c] = mean[c];
  coeffs[kD * C + c] = bias ? static_cast<T>(bias[c]) : T(0);
}

// Backward coefficients for channel c from the per-channel sums of dy and dy (x - mean) over
// `count` elements, plus grad_weight = sum(dy xhat) and grad_bias = sum(dy) where wanted.
template <typename T, typename P>
MK_HOST_DEVICE void backward_coeffs(int64_t c, int64_t C, bool train, const T* mean, const T* var,
                                    const P* weight, double eps, const T* sum_dy,
                                    const T* sum_dy_xmu, T count, T* coeffs, P* grad_weight,
                                    P* grad_bias) {
  const T invstd = invstd_of(var[c], eps);
  const T a = weight ? static_cast<T>(weight[c]) * invstd : invstd;
  coeffs[kA * C + c] = a;
  coeffs[kM * C + c] = mean[c];
  if (train && count > T(0)) {
    coeffs[kB * C + c] = -a * invstd * invstd * sum_dy_xmu[c] / count;
    coeffs[kD * C + c] = -a * sum_dy[c] / count;
  } else {
    coeffs[kB * C + c] = T(0);
    coeffs[kD * C + c] = T(0);
  }
  if (grad_weight) grad_weight[c] = static_cast<P>(sum_dy_xmu[c] * invstd);
  if (grad_bias) grad_bias[c] = static_cast<P>(sum_dy[c]);
}

// running = factor * batch + (1 - factor) * running, with the unbiased variance M2 / (n - 1),
// in torch's order of operations and in its precision A: double on the CPU (torch's CPU kernel
// computes with its double momentum), the opmath type T on CUDA.
template <typename A, typename T, typename P>
MK_HOST_DEVICE void update_running(int64_t c, const T* mean, const T* var, A count, A factor,
                                   P* running_mean, P* running_var) {
  const A unbiased = static_cast<A>(var[c]) * count / (count - A(1));
  running_mean[c] = static_cast<P>(factor * static_cast<A>(mean[c]) +
                                   (A(1) - factor) * static_cast<A>(running_mean[c]));
  running_var[c] = static_cast<P>(factor * unbiased + (A(1) - factor) * static_cast<A>(running_var[c]));
}

// Chan et al.'s pairwise combination of (count, mean, M2) moments: exact in exact arithmetic
// and stable in floating point, so partial moments can be merged in any order. An empty side
// changes nothing (merged into, it is a copy), and the mean is the weighted sum of the two, so
// that an infinite mean stays infinite, as in torch (mean += (mean_b - mean) wb would make it
// inf - inf = NaN).
template <typename T>
struct Moments {
  T n = T(0);
  T mean = T(0);
  T m2 = T(0);

  MK_HOST_DEVICE void merge(T nb, T mean_b, T m2_b) {
    if (nb == T(0)) return;
    if (n == T(0)) {
      n = nb;
      mean = mean_b;
      m2 = m2_b;
      return;
    }
    const T total = n + nb;
    const T delta = mean_b - mean;
    const T wb = nb / total;
    mean = mean * (n / total) + mean_b * wb;
    m2 += m2_b + delta * delta * n * wb;
    n = total;
  }
  MK_HOST_DEVICE void merge(const Moments& o) { merge(o.n, o.mean, o.m2); }
};

}  // namespace modekernels::batch_norm

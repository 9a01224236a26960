// BatchNorm on the CPU.
//
// moments: the work is cut into tasks that at::parallel_for shares out. Channels-first memory
//   (N, C, S): a task is one channel over a range of the batch, so few channels still fill every
//   thread; each (n, c) row of S elements gets its mean and M2 in one sweep (shifted sums, below)
//   and is merged into the task's moments with Chan's formula. Channels-last memory (N*S, C):
//   a task is a range of rows; blocks of rows (>= 64 rows) get per-channel sums of (x - K) and
//   (x - K)^2 in one sweep, K being the task's first row, so the squares never lose precision to
//   a large mean; each block is merged per channel. Task results are merged per channel at the
//   end. One pass over memory.
// grad_sums: the same task split, accumulating sum(dy) and sum(dy (x - mean)). One pass.
// affine: out = p a + (q - m) b + d per element (batch_norm_math.h), one pass, parallel over rows.
// Row-level sums use 16 independent accumulators held in one GCC vector (SIMD, and enough to
// hide the add latency), in the opmath
// type; task and final merges are in double.
#include "batch_norm/batch_norm.h"
#include "batch_norm/batch_norm_math.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace modekernels::batch_norm {

namespace generic {
#include "batch_norm/batch_norm_cpu_kernels.h"
}  // namespace generic

#if defined(__x86_64__) && defined(__GNUC__)
#define MK_BN_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "batch_norm/batch_norm_cpu_kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace {

const Backend& cpu_backend() {
#ifdef MK_BN_AVX2
  static const bool avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2_fma) return avx2::kCpu;
#endif
  return generic::kCpu;
}

}  // namespace

TORCH_LIBRARY_IMPL(modekernels, CPU, m) {
  using CpuOps = Ops<cpu_backend>;
  m.impl("batch_norm_train", &CpuOps::batch_norm_train);
  m.impl("batch_norm_eval", &CpuOps::batch_norm_eval);
  m.impl("batch_norm_backward", &CpuOps::batch_norm_backward);
  m.impl("batch_norm_stats", &CpuOps::batch_norm_stats);
  m.impl("batch_norm_grad_sums", &CpuOps::batch_norm_grad_sums);
  m.impl("batch_norm_update_stats_", &CpuOps::batch_norm_update_stats_);
}

}  // namespace modekernels::batch_norm

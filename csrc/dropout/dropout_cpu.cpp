// Dropout on the CPU: one fused pass over memory (read src, write dst; in place when they alias).
//
// The buffer is cut into blocks of kBlock elements shared out by at::parallel_for. For each block
// the Philox words of its kBlock / 4 groups are computed first (eight counters at a time with
// AVX2, see common/philox_cpu.h) and turned into per-element multipliers (scale or 0); then
// dst = src * multiplier in a loop the compiler vectorizes. Words and multipliers stay in L1. The random stream is the one of dropout.h, so CUDA gives the same mask for the same
// (seed, offset).
#include "common/philox_cpu.h"
#include "dropout/dropout.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>

namespace modekernels::dropout {
namespace {

constexpr int64_t kBlock = 256;

template <typename opmath_t>
void block_multipliers(uint64_t seed, uint64_t offset, uint64_t first_group, int64_t groups,
                       uint32_t threshold, opmath_t scale, opmath_t* mult) {
  alignas(64) uint32_t words[kBlock];
  const uint64_t block = offset / 4;
  philox_groups(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), first_group,
                groups, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), words);
  for (int64_t i = 0; i < 4 * groups; ++i) {
    mult[i] = multiplier(words[i], threshold, scale);
  }
}

template <typename scalar_t>
void apply_dense(const scalar_t* src, scalar_t* dst, int64_t n, uint64_t seed, uint64_t offset,
                 double p) {
  using opmath_t = at::opmath_type<scalar_t>;
  const uint32_t threshold = keep_threshold(p);
  const auto scale = static_cast<opmath_t>(keep_scale(p));
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, at::internal::GRAIN_SIZE / kBlock, [&](int64_t b0, int64_t b1) {
    alignas(64) opmath_t mult[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * kBlock;
      const int64_t len = std::min(kBlock, n - begin);
      block_multipliers(seed, offset, static_cast<uint64_t>(begin / 4), (len + 3) / 4, threshold,
                        scale, mult);
      const scalar_t* s = src + begin;
      scalar_t* d = dst + begin;
      for (int64_t i = 0; i < len; ++i) {
        d[i] = static_cast<scalar_t>(static_cast<opmath_t>(s[i]) * mult[i]);
      }
    }
  });
}

void apply_cpu(const at::Tensor& src, const at::Tensor& dst, double p,
               const std::optional<at::Generator>& generator, const at::Tensor& state, bool draw) {
  int64_t* st = state.data_ptr<int64_t>();
  if (draw) {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
        generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    st[0] = static_cast<int64_t>(gen->random64());
    st[1] = 0;
  }
  const auto seed = static_cast<uint64_t>(st[0]);
  const auto offset = static_cast<uint64_t>(st[1]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "modekernels_dropout_cpu", [&] {
    apply_dense<scalar_t>(src.const_data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), src.numel(),
                          seed, offset, p);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(modekernels, CPU, m) {
  using CpuOps = Ops<apply_cpu>;
  m.impl("dropout", &CpuOps::dropout);
  m.impl("dropout_", &CpuOps::dropout_);
  m.impl("dropout_backward", &CpuOps::dropout_backward);
}

}  // namespace modekernels::dropout

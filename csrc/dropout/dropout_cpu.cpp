// Dropout on the CPU: one fused pass over memory (read src, write dst; in place when they alias).
//
// The buffer is cut into blocks of kBlock elements shared out by at::parallel_for. For each block
// the Philox words of its kBlock / 4 groups are computed first (eight counters at a time with
// AVX2, see common/philox_cpu.h) and turned into per-element multipliers (scale or 0); then
// dst = src * multiplier in a loop the compiler vectorizes. Words and multipliers stay in L1.
// The fused variants (bias, residual) do their adds in the same pass; channel-wise dropout
// computes one multiplier per (n, c) and applies it to that channel's elements, also one pass.
// The random stream is the one of dropout.h, so CUDA gives the same mask for the same
// (seed, offset); with p == 0 no words are computed at all. A channel-wise output of 16 MB or
// more that is not the input goes past the caches (common/stream.h), a span at a time from a
// buffer in L1, or for float16 and bfloat16 as it is narrowed: Dropout2d's forward+backward took
// 2.1 ms instead of 2.4-2.8 in float32 at 8x256x56x56, 2.3 ms instead of 3.5-3.7 in float16 and
// bfloat16 at 16x256x56x56. Elementwise dropout, bound by its Philox arithmetic (its float32 and
// bfloat16 passes take about as long), measured level to 5% slower streamed, and keeps ordinary
// stores.
//
// Built three times (common/cpu_capability.h), for the baseline ISA and from dropout_cpu_avx2.cpp
// and dropout_cpu_avx512.cpp for AVX2 and AVX-512: their loops are 8 and 16 float lanes wide, and
// they convert float16 and bfloat16 in spans of 32 (common/staged.h: float16 with F16C, bfloat16
// with integer operations or AVX512-BF16).
#include "common/convert.h"
#include "common/cpu_capability.h"
#include "common/parallel.h"
#include "common/staged.h"
#include "common/stream.h"
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
#include <vector>

MK_CPU_ISA_TARGET

namespace modekernels::dropout {
namespace MK_CPU_ISA {
using namespace ::modekernels::MK_CPU_ISA;  // common/staged.h, this build's
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

// A span's operands and results in opmath (float16 and bfloat16 staged in the AVX2 and AVX-512
// builds).
template <typename scalar_t>
using In = BlockIn<scalar_t>;
template <typename scalar_t>
using Out = BlockOut<scalar_t>;

// The elements In and Out take at a time: kStagedSpan where staged (common/staged.h), kBlock
// otherwise.
template <typename scalar_t>
constexpr int64_t kSpan = staged_span<scalar_t> ? kStagedSpan : kBlock;

// dst[i] = src[i] * m(i) for i < n; with `stream`, each span's results go past the caches:
// narrowed where staged, otherwise through a buffer in L1, which stream_span copies to dst.
template <typename scalar_t, typename Mult>
void scale_blocks(const scalar_t* src, scalar_t* dst, int64_t n, bool stream, const Mult& m) {
  for_spans<scalar_t>(0, n, kSpan<scalar_t>, [&](int64_t b, auto len) MK_SPAN_BODY {
    const In<scalar_t> x(src + b, len);
    alignas(64) scalar_t buf[kSpan<scalar_t>];
    const bool copy_out = stream && !staged_span<scalar_t>;
    Out<scalar_t> y(copy_out ? buf : dst + b);
    for (int64_t i = 0; i < len; ++i) y.set(i, x[i] * m(b + i));
    y.store(len, stream);
    if (copy_out) stream_span(dst + b, buf, len);
  });
}

// The factor a kept element is multiplied by on the CPU: torch's CPU dropout multiplies by a
// mask of keep_scale in the input's dtype (bernoulli_(1 - p).div_(1 - p)), so a float16 or
// bfloat16 scale is rounded to it first. (torch's CUDA kernel, as ours, keeps it in opmath.)
template <typename scalar_t>
at::opmath_type<scalar_t> cpu_keep_scale(double p) {
  using opmath_t = at::opmath_type<scalar_t>;
  return static_cast<opmath_t>(static_cast<scalar_t>(keep_scale<opmath_t>(p)));
}

template <typename scalar_t>
struct Extras {
  const scalar_t* residual;  // or null
  const scalar_t* bias;      // or null
  int64_t H;                 // bias length
};

// Elementwise dropout: Philox words a block at a time, then one vectorizable pass over the
// block: dst = src * m, or with the fusion terms (kBias, kResidual)
// dst = (src + bias[i % H]) * m + residual, in opmath. Each task widens the bias once, repeated
// so that any span finds its bias terms in one run (no element takes i % H).
template <typename scalar_t, bool kBias, bool kResidual>
void apply_elementwise(const scalar_t* src, scalar_t* dst, int64_t n, uint64_t seed,
                       uint64_t offset, double p, const Extras<scalar_t>& extras) {
  using opmath_t = at::opmath_type<scalar_t>;
  const uint32_t threshold = keep_threshold(p);
  const auto scale = cpu_keep_scale<scalar_t>(p);
  const bool masked = p > 0.0;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, grain_for(kBlock), [&](int64_t b0, int64_t b1) {
    alignas(64) opmath_t mult[kBlock];
    if (!masked) std::fill(mult, mult + kBlock, opmath_t(1));
    // bias[t % H] for t < H + kSpan: the span from element i on has its terms from bias[i % H] on.
    std::vector<opmath_t> bias(kBias ? extras.H + kSpan<scalar_t> : 0);
    for (size_t t = 0; t < bias.size(); ++t) bias[t] = widen<opmath_t>(extras.bias[t % extras.H]);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * kBlock;
      const int64_t len = std::min(kBlock, n - begin);
      if (masked) {
        block_multipliers(seed, offset, static_cast<uint64_t>(begin / 4), (len + 3) / 4,
                          threshold, scale, mult);
      }
      const auto span_of_block = [&](int64_t at, auto span) MK_SPAN_BODY {
        const opmath_t* m = mult + (at - begin);
        const In<scalar_t> x(src + at, span);
        const In<scalar_t> residual(kResidual ? extras.residual + at : nullptr, kResidual ? span : 0);
        Out<scalar_t> y(dst + at);
        const opmath_t* bias_at = kBias ? bias.data() + at % extras.H : nullptr;
        for (int64_t i = 0; i < span; ++i) {
          opmath_t v = x[i];
          if constexpr (kBias) v += bias_at[i];
          v *= m[i];
          if constexpr (kResidual) v += residual[i];
          y.set(i, v);
        }
        y.store(span);
      };
      for_spans<scalar_t>(begin, begin + len, kSpan<scalar_t>, span_of_block);
    }
  });
}

// The multipliers of units [u0, u0 + count) into mult: unit u takes the word of element u of
// elementwise dropout, so they come kBlock / 4 Philox groups at a time, as there.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void unit_multipliers(uint64_t seed, uint64_t offset, double p, int64_t u0, int64_t count,
                      opmath_t* mult) {
  if (p == 0.0) {
    std::fill(mult, mult + count, opmath_t(1));
    return;
  }
  alignas(64) opmath_t block[kBlock];
  for (int64_t u = u0; u < u0 + count;) {
    const int64_t g0 = u / 4;
    const int64_t g1 = std::min((u0 + count + 3) / 4, g0 + kBlock / 4);
    block_multipliers(seed, offset, static_cast<uint64_t>(g0), g1 - g0, keep_threshold(p),
                      cpu_keep_scale<scalar_t>(p), block);
    const int64_t end = std::min(u0 + count, 4 * g1);
    std::copy(block + (u - 4 * g0), block + (end - 4 * g0), mult + (u - u0));
    u = end;
  }
}

// Channel-wise dropout: one multiplier per (n, c) unit, applied to its S elements. (N, C, S)
// memory: parallel over units, their multipliers kBlock at a time. Channels-last (N, S, C):
// parallel over samples, the C multipliers of a sample computed once and applied to each of its
// S rows.
template <typename scalar_t>
void apply_channelwise(const scalar_t* src, scalar_t* dst, int64_t n, uint64_t seed,
                       uint64_t offset, double p, const Fusion& f, bool stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t S = f.channel_S;
  const int64_t units = n / S;
  if (f.channels_last_C == 0) {
    at::parallel_for(0, units, grain_for(S), [&](int64_t u0, int64_t u1) {
      alignas(64) opmath_t mult[kBlock];
      for (int64_t b = u0; b < u1; b += kBlock) {
        const int64_t count = std::min(kBlock, u1 - b);
        unit_multipliers<scalar_t>(seed, offset, p, b, count, mult);
        for (int64_t k = 0; k < count; ++k) {
          const opmath_t m = mult[k];
          scale_blocks(src + (b + k) * S, dst + (b + k) * S, S, stream, [m](int64_t) { return m; });
        }
      }
      if (stream) stream_fence();
    });
  } else {
    const int64_t C = f.channels_last_C;
    at::parallel_for(0, units / C, grain_for(C * S), [&](int64_t n0, int64_t n1) {
      std::vector<opmath_t> mult(C);
      for (int64_t sample = n0; sample < n1; ++sample) {
        unit_multipliers<scalar_t>(seed, offset, p, sample * C, C, mult.data());
        for (int64_t row = 0; row < S; ++row) {
          const int64_t base = (sample * S + row) * C;
          scale_blocks(src + base, dst + base, C, stream, [&mult](int64_t c) { return mult[c]; });
        }
      }
      if (stream) stream_fence();
    });
  }
}

template <typename scalar_t>
const scalar_t* ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

}  // namespace

void apply_cpu(const at::Tensor& src, const at::Tensor& dst, double p,
               const std::optional<at::Generator>& generator, const at::Tensor& state, bool draw,
               const Fusion& fusion) {
  int64_t* st = state.data_ptr<int64_t>();
  if (draw && (p == 0.0 || p == 1.0)) {
    st[0] = st[1] = 0;
  } else if (draw) {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
        generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    st[0] = static_cast<int64_t>(gen->random64());
    st[1] = 0;
  }
  const auto seed = static_cast<uint64_t>(st[0]);
  const auto offset = static_cast<uint64_t>(st[1]);
  const int64_t n = src.numel();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "modekernels_dropout_cpu", [&] {
    const scalar_t* s = src.const_data_ptr<scalar_t>();
    scalar_t* d = dst.data_ptr<scalar_t>();
    if (fusion.channel_S > 0) {
      // In place, each line is in cache when it is written (read just before): nothing to save.
      apply_channelwise<scalar_t>(s, d, n, seed, offset, p, fusion, d != s && streams(dst));
      return;
    }
    const Extras<scalar_t> extras{ptr<scalar_t>(fusion.residual), ptr<scalar_t>(fusion.bias),
                                  fusion.bias.defined() ? fusion.bias.numel() : 1};
    if (extras.bias) {
      // The op bodies pass a bias only together with a residual (bias_dropout_add).
      TORCH_INTERNAL_ASSERT(extras.residual);
      apply_elementwise<scalar_t, true, true>(s, d, n, seed, offset, p, extras);
    } else if (extras.residual) {
      apply_elementwise<scalar_t, false, true>(s, d, n, seed, offset, p, extras);
    } else {
      apply_elementwise<scalar_t, false, false>(s, d, n, seed, offset, p, extras);
    }
  });
}

}  // namespace MK_CPU_ISA

#ifdef MK_CPU_BASELINE_BUILD
#ifdef MK_CPU_AVX2
namespace avx2 {
decltype(baseline::apply_cpu) apply_cpu;  // dropout_cpu_avx2.cpp
}
namespace avx512 {
decltype(baseline::apply_cpu) apply_cpu;  // dropout_cpu_avx512.cpp
}
#endif

namespace {
// The widest build the CPU and torch allow (common/cpu_capability.h).
void apply_cpu(const at::Tensor& src, const at::Tensor& dst, double p,
               const std::optional<at::Generator>& generator, const at::Tensor& state, bool draw,
               const Fusion& fusion) {
#ifdef MK_CPU_AVX2
  if (cpu_avx512()) return avx512::apply_cpu(src, dst, p, generator, state, draw, fusion);
  if (cpu_avx2()) return avx2::apply_cpu(src, dst, p, generator, state, draw, fusion);
#endif
  baseline::apply_cpu(src, dst, p, generator, state, draw, fusion);
}
}  // namespace

TORCH_LIBRARY_IMPL(modekernels, CPU, m) {
  Ops<apply_cpu>::register_all(m);
}
#endif

}  // namespace modekernels::dropout

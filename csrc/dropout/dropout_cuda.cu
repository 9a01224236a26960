// Dropout on CUDA: one fused pass over memory (read src, write dst; in place when they alias).
//
// Each thread of a grid-stride loop takes kVec consecutive elements (a multiple of 4, one or two
// 128-bit loads), computes one Philox4x32-10 block per group of 4 elements with the stream of
// dropout.h, and writes src * mask * scale with 128-bit stores; the last n % kVec elements take
// one thread each. 32-bit indexing when the tensor fits, 64-bit otherwise. The (seed, offset)
// come from torch's CUDA generator as a PhiloxCudaState, unpacked on the device, so the kernel is
// safe under CUDA graph capture; the block that owns element 0 records them in `state` for the
// backward, which reads them back from device memory without a host synchronization. With p == 0
// nothing is drawn and no Philox block is computed (every multiplier is 1; state (0, 0)); with
// p == 1 nothing is drawn either (every multiplier is 0 whatever the words; state (0, 0)).
// The fused variants add bias and residual in the same pass (the bias index stepped along, not
// divided out per element); channel-wise dropout runs the same loop with one word per (n, c) unit
// for all its elements, walking the units of a vector without divisions and computing a Philox
// block once per group of 4 units it touches, also one pass. Multiplies are rounded on their own
// (no fma), as on the CPU, so that both give the same bits (but for a NaN's in float16 and
// bfloat16: CUDA's conversions store their own quiet NaN, as in torch).
#include "common/cuda_utils.cuh"
#include "dropout/dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <mutex>

namespace modekernels::dropout {
namespace {

template <typename scalar_t>
constexpr int kVecOf = 16 / sizeof(scalar_t) < 4 ? 4 : 16 / sizeof(scalar_t);

template <typename scalar_t>
struct Extras {
  const scalar_t* residual;  // or null
  const scalar_t* bias;      // or null
  int64_t H;                 // bias length
  int64_t S;                 // channel-wise: elements per (n, c); 0 for elementwise
  int64_t C;                 // channel-wise over channels-last memory: channels; else 0
};

// The call's (seed, offset): drawn from the generator's PhiloxCudaState (and recorded in `state`
// by the first thread) or read back from `state`.
__device__ __forceinline__ void seed_offset(const at::PhiloxCudaState& philox, int64_t* state,
                                            bool draw, uint64_t& seed, uint64_t& offset) {
  if (draw) {
    const auto so = at::cuda::philox::unpack(philox);
    seed = std::get<0>(so);
    offset = std::get<1>(so);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      state[0] = static_cast<int64_t>(seed);
      state[1] = static_cast<int64_t>(offset);
    }
  } else {
    seed = static_cast<uint64_t>(state[0]);
    offset = static_cast<uint64_t>(state[1]);
  }
}

// What a kernel adds to x * m: nothing (kPlain), bias and residual (kFused), or nothing with
// one mask word per (n, c) unit instead of per element (kChannel).
enum class Mode { kPlain, kFused, kChannel };

// a * b rounded on its own: nvcc would otherwise fuse it with a following add into one fma,
// which rounds once where the CPU kernels round twice.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// (x + bias[h]) * m + residual[i] for kFused (h = i % H, tracked by the caller), x * m otherwise.
template <Mode kMode, typename scalar_t, typename index_t, typename opmath_t>
__device__ __forceinline__ scalar_t combine(scalar_t x, index_t i, index_t h, opmath_t m,
                                            const Extras<scalar_t>& e) {
  opmath_t v = static_cast<opmath_t>(x);
  if constexpr (kMode == Mode::kFused) {
    if (e.bias) v += static_cast<opmath_t>(e.bias[h]);
  }
  v = mul_rn(v, m);
  if constexpr (kMode == Mode::kFused) {
    if (e.residual) v += static_cast<opmath_t>(e.residual[i]);
  }
  return static_cast<scalar_t>(v);
}

// r.w[lane] without indexing the array at run time (which would put it in local memory).
__device__ __forceinline__ uint32_t lane_word(const Philox4x32& r, uint32_t lane) {
  return lane == 0 ? r.w[0] : lane == 1 ? r.w[1] : lane == 2 ? r.w[2] : r.w[3];
}

// Channel-wise dropout's units, walked element by element from element i without divisions:
// unit(i) = i / S over (N, C, S) memory (C == 0), n * C + c over channels-last (N, S, C) memory,
// where i = (n * S + s) * C + c. The Philox block of the current unit's group is kept, so
// elements of one unit, or of units of one group, compute it once.
template <typename index_t>
struct UnitMask {
  index_t S, C;
  index_t unit;
  index_t pos;  // channels-first: i % S; channels-last: c
  index_t row;  // channels-last: s
  uint64_t group = ~uint64_t{0};
  Philox4x32 r{};

  __device__ UnitMask(index_t i, index_t S_, index_t C_) : S(S_), C(C_) {
    if (C == 0) {
      unit = i / S;
      pos = i % S;
      row = 0;
    } else {
      pos = i % C;
      const index_t rows = i / C;
      row = rows % S;
      unit = rows / S * C + pos;
    }
  }
  // The current element's mask word.
  __device__ uint32_t word(uint64_t seed, uint64_t offset) {
    const auto u = static_cast<uint64_t>(unit);
    if (u / 4 != group) {
      group = u / 4;
      r = group_bits(seed, offset, group);
    }
    return lane_word(r, static_cast<uint32_t>(u % 4));
  }
  __device__ void next() {
    if (C == 0) {
      if (++pos == S) {
        pos = 0;
        ++unit;
      }
    } else {
      ++unit;
      if (++pos == C) {  // the next row of the sample, or the next sample's first row
        pos = 0;
        unit -= C;
        if (++row == S) {
          row = 0;
          unit += C;
        }
      }
    }
  }
};

// Elements [i0, i0 + kVec) of a vector: x.v[k] = combine(x.v[k], m(i0 + k)). Elementwise, one
// Philox block per group of 4 (i0 is a multiple of 4 where kVec > 1); channel-wise, one per group
// of units the vector touches.
template <Mode kMode, int kVec, typename scalar_t, typename index_t, typename opmath_t>
__device__ __forceinline__ void apply_vec(cuda::Vec<scalar_t, kVec>& x, index_t i0, uint64_t seed,
                                          uint64_t offset, bool masked, uint32_t threshold,
                                          opmath_t scale, const Extras<scalar_t>& e) {
  if constexpr (kMode == Mode::kChannel) {
    UnitMask<index_t> units(i0, static_cast<index_t>(e.S), static_cast<index_t>(e.C));
    MK_UNROLL
    for (int k = 0; k < kVec; ++k) {
      const opmath_t m = masked ? multiplier(units.word(seed, offset), threshold, scale) : opmath_t(1);
      x.v[k] = combine<kMode>(x.v[k], i0 + k, index_t(0), m, e);
      units.next();
    }
  } else {
    index_t h = kMode == Mode::kFused ? i0 % static_cast<index_t>(e.H) : 0;  // the bias index
    MK_UNROLL
    for (int g = 0; g < (kVec + 3) / 4; ++g) {
      Philox4x32 r{};
      if (masked) r = group_bits(seed, offset, static_cast<uint64_t>(i0) / 4 + g);
      MK_UNROLL
      for (int lane = 0; lane < 4 && 4 * g + lane < kVec; ++lane) {
        const int k = 4 * g + lane;
        const uint32_t w = kVec >= 4 ? r.w[lane] : lane_word(r, static_cast<uint32_t>(i0 % 4));
        const opmath_t m = masked ? multiplier(w, threshold, scale) : opmath_t(1);
        x.v[k] = combine<kMode>(x.v[k], i0 + k, h, m, e);
        if (kMode == Mode::kFused && ++h == static_cast<index_t>(e.H)) h = 0;
      }
    }
  }
}

template <typename scalar_t, typename index_t, bool kAligned, Mode kMode>
__global__ void __launch_bounds__(cuda::kThreads)
    dropout_kernel(const scalar_t* src, scalar_t* dst, index_t n, at::PhiloxCudaState philox,
                   int64_t* state, bool draw, bool masked, uint32_t threshold,
                   at::opmath_type<scalar_t> scale, Extras<scalar_t> extras) {
  constexpr int kVec = kVecOf<scalar_t>;
  using V = cuda::Vec<scalar_t, kVec>;
  uint64_t seed;
  uint64_t offset;
  seed_offset(philox, state, draw, seed, offset);

  const index_t tid = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t nvec = n / kVec;  // v < nvec, so v + stride stays below n for index_t
  for (index_t v = tid; v < nvec; v += stride) {
    V x;
    if constexpr (kAligned) {
      x = reinterpret_cast<const V*>(src)[v];
    } else {
      MK_UNROLL
      for (int k = 0; k < kVec; ++k) x.v[k] = src[v * kVec + k];
    }
    apply_vec<kMode>(x, v * kVec, seed, offset, masked, threshold, scale, extras);
    if constexpr (kAligned) {
      reinterpret_cast<V*>(dst)[v] = x;
    } else {
      MK_UNROLL
      for (int k = 0; k < kVec; ++k) dst[v * kVec + k] = x.v[k];
    }
  }
  if (tid < n - nvec * kVec) {
    const index_t i = nvec * kVec + tid;
    cuda::Vec<scalar_t, 1> x{{src[i]}};
    apply_vec<kMode>(x, i, seed, offset, masked, threshold, scale, extras);
    dst[i] = x.v[0];
  }
}

template <typename scalar_t, typename index_t, bool kAligned, Mode kMode>
void launch(const scalar_t* src, scalar_t* dst, int64_t n, const at::PhiloxCudaState& philox,
            int64_t* state, bool draw, double p, const Extras<scalar_t>& extras) {
  const int64_t work = std::max<int64_t>(n / kVecOf<scalar_t>, n % kVecOf<scalar_t>);
  dropout_kernel<scalar_t, index_t, kAligned, kMode>
      <<<cuda::grid_size(work), cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          src, dst, static_cast<index_t>(n), philox, state, draw, p > 0.0, keep_threshold(p),
          keep_scale<at::opmath_type<scalar_t>>(p), extras);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t, bool kAligned>
void launch(const scalar_t* src, scalar_t* dst, int64_t n, const at::PhiloxCudaState& philox,
            int64_t* state, bool draw, double p, const Extras<scalar_t>& extras) {
  if (extras.S > 0) {
    launch<scalar_t, index_t, kAligned, Mode::kChannel>(src, dst, n, philox, state, draw, p, extras);
  } else if (extras.residual || extras.bias) {
    launch<scalar_t, index_t, kAligned, Mode::kFused>(src, dst, n, philox, state, draw, p, extras);
  } else {
    launch<scalar_t, index_t, kAligned, Mode::kPlain>(src, dst, n, philox, state, draw, p, extras);
  }
}

template <typename scalar_t, typename index_t>
void launch(const scalar_t* src, scalar_t* dst, int64_t n, const at::PhiloxCudaState& philox,
            int64_t* state, bool draw, double p, const Extras<scalar_t>& extras) {
  if (cuda::aligned16(src) && cuda::aligned16(dst)) {
    launch<scalar_t, index_t, true>(src, dst, n, philox, state, draw, p, extras);
  } else {
    launch<scalar_t, index_t, false>(src, dst, n, philox, state, draw, p, extras);
  }
}

template <typename scalar_t>
const scalar_t* ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

void apply_cuda(const at::Tensor& src, const at::Tensor& dst, double p,
                const std::optional<at::Generator>& generator, const at::Tensor& state, bool draw,
                const Fusion& fusion) {
  c10::cuda::CUDAGuard guard(src.device());
  at::PhiloxCudaState philox;  // default: unpacks to (0, 0), the state recorded for p == 0 or 1
  if (draw && p > 0.0 && p < 1.0) {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator(src.device().index()));
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(4);
  }
  const int64_t n = src.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "modekernels_dropout_cuda", [&] {
    const scalar_t* s = src.const_data_ptr<scalar_t>();
    scalar_t* d = dst.data_ptr<scalar_t>();
    int64_t* st = state.data_ptr<int64_t>();
    const Extras<scalar_t> extras{ptr<scalar_t>(fusion.residual), ptr<scalar_t>(fusion.bias),
                                  fusion.bias.defined() ? fusion.bias.numel() : 1,
                                  fusion.channel_S, fusion.channels_last_C};
    if (cuda::fits_int32(n)) {
      launch<scalar_t, int32_t>(s, d, n, philox, st, draw, p, extras);
    } else {
      launch<scalar_t, int64_t>(s, d, n, philox, st, draw, p, extras);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(modekernels, CUDA, m) {
  Ops<apply_cuda>::register_all(m);
}

}  // namespace modekernels::dropout

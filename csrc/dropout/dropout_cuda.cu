// Dropout on CUDA: one fused pass over memory (read src, write dst; in place when they alias).
//
// Each thread of a grid-stride loop takes kVec consecutive elements (a multiple of 4, one or two
// 128-bit loads), computes one Philox4x32-10 block per group of 4 elements with the stream of
// dropout.h, and writes src * mask * scale with 128-bit stores; the last n % kVec elements take
// one thread each. 32-bit indexing when the tensor fits, 64-bit otherwise. The (seed, offset)
// come from torch's CUDA generator as a PhiloxCudaState, unpacked on the device, so the kernel is
// safe under CUDA graph capture; the block that owns element 0 records them in `state` for the
// backward, which reads them back from device memory without a host synchronization. With p == 0
// nothing is drawn and no Philox block is computed (every multiplier is 1; state (0, 0)).
// The fused variants add bias and residual in the same pass; channel-wise dropout takes one word
// per (n, c) unit for all its elements, also one pass.
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

// (x + bias[i % H]) * m + residual[i]; plain x * m unless kFused.
template <bool kFused, typename scalar_t, typename opmath_t>
__device__ __forceinline__ scalar_t combine(scalar_t x, int64_t i, opmath_t m,
                                            const Extras<scalar_t>& e) {
  opmath_t v = static_cast<opmath_t>(x);
  if constexpr (kFused) {
    if (e.bias) v += static_cast<opmath_t>(e.bias[i % e.H]);
  }
  v *= m;
  if constexpr (kFused) {
    if (e.residual) v += static_cast<opmath_t>(e.residual[i]);
  }
  return static_cast<scalar_t>(v);
}

template <typename scalar_t, typename index_t, bool kAligned, bool kFused>
__global__ void __launch_bounds__(cuda::kThreads)
    dropout_kernel(const scalar_t* src, scalar_t* dst, index_t n, at::PhiloxCudaState philox,
                   int64_t* state, bool draw, bool masked, uint32_t threshold,
                   at::opmath_type<scalar_t> scale, Extras<scalar_t> extras) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kVec = kVecOf<scalar_t>;
  using V = cuda::Vec<scalar_t, kVec>;
  uint64_t seed;
  uint64_t offset;
  seed_offset(philox, state, draw, seed, offset);

  const index_t tid = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t nvec = n / kVec;
  for (index_t v = tid; v < nvec; v += stride) {
    V x;
    if constexpr (kAligned) {
      x = reinterpret_cast<const V*>(src)[v];
    } else {
      MK_UNROLL
      for (int k = 0; k < kVec; ++k) x.v[k] = src[v * kVec + k];
    }
    MK_UNROLL
    for (int g = 0; g < kVec / 4; ++g) {
      Philox4x32 r{};
      if (masked) r = group_bits(seed, offset, static_cast<uint64_t>(v) * (kVec / 4) + g);
      MK_UNROLL
      for (int lane = 0; lane < 4; ++lane) {
        const int k = 4 * g + lane;
        const opmath_t m = masked ? multiplier(r.w[lane], threshold, scale) : opmath_t(1);
        x.v[k] = combine<kFused>(x.v[k], static_cast<int64_t>(v) * kVec + k, m, extras);
      }
    }
    if constexpr (kAligned) {
      reinterpret_cast<V*>(dst)[v] = x;
    } else {
      MK_UNROLL
      for (int k = 0; k < kVec; ++k) dst[v * kVec + k] = x.v[k];
    }
  }
  if (tid < n - nvec * kVec) {
    const index_t i = nvec * kVec + tid;
    opmath_t m = 1;
    if (masked) {
      const Philox4x32 r = group_bits(seed, offset, static_cast<uint64_t>(i) / 4);
      m = multiplier(r.w[i % 4], threshold, scale);
    }
    dst[i] = combine<kFused>(src[i], i, m, extras);
  }
}

// Channel-wise: element i belongs to unit (n, c): i / S over (N, C, S) memory, n * C + c over
// channels-last (N, S, C) memory; the unit's word decides for all its elements.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(cuda::kThreads)
    channelwise_kernel(const scalar_t* src, scalar_t* dst, index_t n, at::PhiloxCudaState philox,
                       int64_t* state, bool draw, bool masked, uint32_t threshold,
                       at::opmath_type<scalar_t> scale, Extras<scalar_t> extras) {
  using opmath_t = at::opmath_type<scalar_t>;
  uint64_t seed;
  uint64_t offset;
  seed_offset(philox, state, draw, seed, offset);
  const index_t S = static_cast<index_t>(extras.S);
  const index_t C = static_cast<index_t>(extras.C);
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    opmath_t m = 1;
    if (masked) {
      const index_t u = C ? i / (S * C) * C + i % C : i / S;
      const Philox4x32 r = group_bits(seed, offset, static_cast<uint64_t>(u) / 4);
      m = multiplier(r.w[u % 4], threshold, scale);
    }
    dst[i] = static_cast<scalar_t>(static_cast<opmath_t>(src[i]) * m);
  }
}

template <typename scalar_t, typename index_t, bool kAligned, bool kFused>
void launch(const scalar_t* src, scalar_t* dst, int64_t n, const at::PhiloxCudaState& philox,
            int64_t* state, bool draw, double p, const Extras<scalar_t>& extras) {
  const int64_t work = std::max<int64_t>(n / kVecOf<scalar_t>, n % kVecOf<scalar_t>);
  dropout_kernel<scalar_t, index_t, kAligned, kFused>
      <<<cuda::grid_size(work), cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          src, dst, static_cast<index_t>(n), philox, state, draw, p > 0.0, keep_threshold(p),
          static_cast<at::opmath_type<scalar_t>>(keep_scale(p)), extras);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t>
void launch(const scalar_t* src, scalar_t* dst, int64_t n, const at::PhiloxCudaState& philox,
            int64_t* state, bool draw, double p, const Extras<scalar_t>& extras) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (extras.S > 0) {
    channelwise_kernel<scalar_t, index_t><<<cuda::grid_size(n), cuda::kThreads, 0, stream>>>(
        src, dst, static_cast<index_t>(n), philox, state, draw, p > 0.0, keep_threshold(p),
        static_cast<at::opmath_type<scalar_t>>(keep_scale(p)), extras);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const bool aligned = cuda::aligned16(src) && cuda::aligned16(dst);
  const bool fused = extras.residual || extras.bias;
  if (aligned) {
    fused ? launch<scalar_t, index_t, true, true>(src, dst, n, philox, state, draw, p, extras)
          : launch<scalar_t, index_t, true, false>(src, dst, n, philox, state, draw, p, extras);
  } else {
    fused ? launch<scalar_t, index_t, false, true>(src, dst, n, philox, state, draw, p, extras)
          : launch<scalar_t, index_t, false, false>(src, dst, n, philox, state, draw, p, extras);
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
  at::PhiloxCudaState philox;  // default: unpacks to (0, 0), the state recorded for p == 0
  if (draw && p > 0.0) {
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

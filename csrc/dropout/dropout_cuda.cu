// Dropout on CUDA: one fused pass over memory (read src, write dst; in place when they alias).
//
// Each thread of a grid-stride loop takes kVec consecutive elements (a multiple of 4, one or two
// 128-bit loads), computes one Philox4x32-10 block per group of 4 elements with the stream of
// dropout.h, and writes src * mask * scale with 128-bit stores; the last n % kVec elements take
// one thread each. 32-bit indexing when the tensor fits, 64-bit otherwise. The (seed, offset)
// come from torch's CUDA generator as a PhiloxCudaState, unpacked on the device, so the kernel is
// safe under CUDA graph capture; the block that owns element 0 records them in `state` for the
// backward, which reads them back from device memory without a host synchronization.
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

template <typename scalar_t, typename index_t, bool kAligned>
__global__ void __launch_bounds__(cuda::kThreads)
    dropout_kernel(const scalar_t* src, scalar_t* dst, index_t n, at::PhiloxCudaState philox,
                   int64_t* state, bool draw, uint32_t threshold, at::opmath_type<scalar_t> scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kVec = kVecOf<scalar_t>;
  using V = cuda::Vec<scalar_t, kVec>;

  uint64_t seed;
  uint64_t offset;
  if (draw) {
    const auto seed_offset = at::cuda::philox::unpack(philox);
    seed = std::get<0>(seed_offset);
    offset = std::get<1>(seed_offset);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      state[0] = static_cast<int64_t>(seed);
      state[1] = static_cast<int64_t>(offset);
    }
  } else {
    seed = static_cast<uint64_t>(state[0]);
    offset = static_cast<uint64_t>(state[1]);
  }

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
      const Philox4x32 r = group_bits(seed, offset, static_cast<uint64_t>(v) * (kVec / 4) + g);
      MK_UNROLL
      for (int lane = 0; lane < 4; ++lane) {
        scalar_t& e = x.v[4 * g + lane];
        e = static_cast<scalar_t>(static_cast<opmath_t>(e) * multiplier(r.w[lane], threshold, scale));
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
    const Philox4x32 r = group_bits(seed, offset, static_cast<uint64_t>(i) / 4);
    dst[i] = static_cast<scalar_t>(static_cast<opmath_t>(src[i]) *
                                   multiplier(r.w[i % 4], threshold, scale));
  }
}

template <typename scalar_t, typename index_t, bool kAligned>
void launch(const scalar_t* src, scalar_t* dst, int64_t n, const at::PhiloxCudaState& philox,
            int64_t* state, bool draw, double p) {
  const int64_t work = std::max<int64_t>(n / kVecOf<scalar_t>, n % kVecOf<scalar_t>);
  dropout_kernel<scalar_t, index_t, kAligned>
      <<<cuda::grid_size(work), cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          src, dst, static_cast<index_t>(n), philox, state, draw, keep_threshold(p),
          static_cast<at::opmath_type<scalar_t>>(keep_scale(p)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void apply_cuda(const at::Tensor& src, const at::Tensor& dst, double p,
                const std::optional<at::Generator>& generator, const at::Tensor& state, bool draw) {
  c10::cuda::CUDAGuard guard(src.device());
  at::PhiloxCudaState philox;
  if (draw) {
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
    const bool aligned = cuda::aligned16(s) && cuda::aligned16(d);
    if (cuda::fits_int32(n)) {
      aligned ? launch<scalar_t, int32_t, true>(s, d, n, philox, st, draw, p)
              : launch<scalar_t, int32_t, false>(s, d, n, philox, st, draw, p);
    } else {
      aligned ? launch<scalar_t, int64_t, true>(s, d, n, philox, st, draw, p)
              : launch<scalar_t, int64_t, false>(s, d, n, philox, st, draw, p);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(modekernels, CUDA, m) {
  using CudaOps = Ops<apply_cuda>;
  m.impl("dropout", &CudaOps::dropout);
  m.impl("dropout_", &CudaOps::dropout_);
  m.impl("dropout_backward", &CudaOps::dropout_backward);
}

}  // namespace modekernels::dropout

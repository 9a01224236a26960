// BatchNorm on CUDA.
//
// Reductions (moments, grad_sums) run in two launches. The first splits the work into a grid of
// (channel tile, row split) blocks so that every SM is busy even when C is small:
//   channels-first (N, C, S): one channel per block column; the block's threads walk its share of
//     the (n, s) positions, coalesced along s;
//   channels-last (N*S, C): 32 channels per block column, one per lane, so a warp reads 128
//     contiguous bytes; the 8 warps of the block take interleaved rows.
// Each thread keeps Welford moments (or plain sums), merged across the block with Chan's formula
// and written as one partial per (channel, split); the second launch merges the partials of each
// channel. One pass over memory; grad_sums with a saved ReLU gate also writes the gated dy.
// affine: out = p a + (q - m) b + d (batch_norm_math.h), one grid-stride pass, 128-bit loads and
// stores when the innermost dimension allows, 32-bit indexing when it fits. Per-channel coefficients and the running-statistics update are one small launch
// each, reading num_batches_tracked on the device, so nothing synchronizes with the host.
#include "batch_norm/batch_norm.h"
#include "batch_norm/batch_norm_math.h"
#include "common/cuda_utils.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace modekernels::batch_norm {
namespace {

constexpr int kLanesCL = 32;   // channels per block in the channels-last reduction
constexpr int kRowsCL = 8;     // rows per block step in the channels-last reduction
constexpr int64_t kPositionsPerBlock = 4 * cuda::kThreads;  // at least, per channels-first reduction block

// Division by a fixed divisor: multiply-shift for 32-bit indices, plain division for 64-bit.
template <typename index_t>
using Divider = at::cuda::detail::IntDivider<index_t>;

// What a reduction accumulates per channel: Welford moments of x, or sums of dy and dy (x - mean).
template <typename T>
struct MomentsAcc {
  Moments<T> m;
  int64_t pushed = 0;  // counted as an integer: a float m.n += 1 stops growing at 2^24
  template <typename scalar_t>
  __device__ void push(const scalar_t* /*dy*/, const GateOf<scalar_t>& /*gate*/, const scalar_t* x,
                       scalar_t* /*gated*/, int64_t i, int64_t /*c*/, T /*center*/) {
    const T v = static_cast<T>(x[i]);
    m.n = static_cast<T>(++pushed);
    const T delta = v - m.mean;
    m.mean += delta / m.n;
    m.m2 += delta * (v - m.mean);
  }
  __device__ void merge(const MomentsAcc& o) { m.merge(o.m); }
  __device__ MomentsAcc shfl_down(unsigned int offset) const {
    MomentsAcc o;
    o.m.n = __shfl_down_sync(0xffffffffu, m.n, offset);
    o.m.mean = __shfl_down_sync(0xffffffffu, m.mean, offset);
    o.m.m2 = __shfl_down_sync(0xffffffffu, m.m2, offset);
    return o;
  }
  // Final per-channel values: out0 = mean, out1 = biased variance.
  __device__ void write(T* out0, T* out1, int64_t c) const {
    out0[c] = m.mean;
    out1[c] = m.n > T(0) ? m.m2 / m.n : T(0);
  }
};

template <typename T>
struct GradAcc {
  T sdy = T(0);
  T sdx = T(0);
  // With `gated`, also writes the gated dy there: dy's value where the gate is open, else +0.
  template <typename scalar_t>
  __device__ void push(const scalar_t* dy, const GateOf<scalar_t>& gate, const scalar_t* x,
                       scalar_t* gated, int64_t i, int64_t c, T center) {
    const bool open = gate.open(i, c);  // the ReLU backward
    const scalar_t d = dy[i];  // read once: the store to `gated` may alias it for all nvcc knows
    if (gated) gated[i] = open ? d : scalar_t(0);
    const T g = open ? static_cast<T>(d) : T(0);
    sdy += g;
    sdx += g * (static_cast<T>(x[i]) - center);
  }
  __device__ void merge(const GradAcc& o) {
    sdy += o.sdy;
    sdx += o.sdx;
  }
  __device__ GradAcc shfl_down(unsigned int offset) const {
    GradAcc o;
    o.sdy = __shfl_down_sync(0xffffffffu, sdy, offset);
    o.sdx = __shfl_down_sync(0xffffffffu, sdx, offset);
    return o;
  }
  __device__ void write(T* out0, T* out1, int64_t c) const {
    out0[c] = sdy;
    out1[c] = sdx;
  }
};

// Merges the accumulators of a whole block (blockDim.x a multiple of 32) into thread 0's.
template <typename Acc>
__device__ Acc block_merge(Acc acc) {
  __shared__ alignas(16) char smem[sizeof(Acc) * 32];
  Acc* warp_accs = reinterpret_cast<Acc*>(smem);
  for (unsigned int off = 16; off > 0; off /= 2) acc.merge(acc.shfl_down(off));
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) warp_accs[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < static_cast<int>(blockDim.x / 32) ? warp_accs[lane] : Acc();
    for (unsigned int off = 16; off > 0; off /= 2) acc.merge(acc.shfl_down(off));
  }
  return acc;
}

// Channels-first partials: block (c, split) covers the positions e = n * S + s of channel c with
// e in [split * N * S / splits, (split+1) * N * S / splits): the (n, s) positions flattened, so
// that a channel splits into as many blocks as the GPU needs however few samples there are and
// every thread has work even when S is small (7x7); e is split into (n, s) with a multiply-shift
// division (IntDivider) when 32 bits suffice.
template <typename scalar_t, typename Acc, typename index_t>
__global__ void __launch_bounds__(cuda::kThreads)
    reduce_cf(const scalar_t* dy, GateOf<scalar_t> gate, const scalar_t* x, scalar_t* gated,
              index_t N, int64_t C, Divider<index_t> s_div,
              const at::opmath_type<scalar_t>* center, Acc* partial) {
  const int64_t c = blockIdx.x;
  const index_t S = s_div.divisor;
  const uint64_t positions = static_cast<uint64_t>(N) * S;
  const index_t e0 = static_cast<index_t>(positions * blockIdx.y / gridDim.y);
  const index_t e1 = static_cast<index_t>(positions * (blockIdx.y + 1) / gridDim.y);
  const auto ctr = center ? center[c] : at::opmath_type<scalar_t>(0);
  Acc acc;
  for (index_t e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
    const auto ns = s_div.divmod(e);
    acc.push(dy, gate, x, gated, (static_cast<int64_t>(ns.div) * C + c) * S + ns.mod, c, ctr);
  }
  acc = block_merge(acc);
  if (threadIdx.x == 0) partial[blockIdx.y * C + c] = acc;
}

// Channels-last partials: block (tile, split), threads (lane = channel in tile, row).
template <typename scalar_t, typename Acc>
__global__ void __launch_bounds__(kLanesCL * kRowsCL)
    reduce_cl(const scalar_t* dy, GateOf<scalar_t> gate, const scalar_t* x, scalar_t* gated,
              int64_t rows, int64_t C, const at::opmath_type<scalar_t>* center, Acc* partial) {
  __shared__ alignas(16) char smem[sizeof(Acc) * kLanesCL * kRowsCL];
  Acc* accs = reinterpret_cast<Acc*>(smem);
  const int lane = threadIdx.x % kLanesCL;
  const int row = threadIdx.x / kLanesCL;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kLanesCL + lane;
  const int64_t splits = gridDim.y;
  const int64_t r0 = rows * blockIdx.y / splits;
  const int64_t r1 = rows * (blockIdx.y + 1) / splits;
  Acc acc;
  if (c < C) {
    const auto ctr = center ? center[c] : at::opmath_type<scalar_t>(0);
    for (int64_t r = r0 + row; r < r1; r += kRowsCL) acc.push(dy, gate, x, gated, r * C + c, c, ctr);
  }
  accs[threadIdx.x] = acc;
  __syncthreads();
  if (row == 0 && c < C) {
    for (int k = 1; k < kRowsCL; ++k) acc.merge(accs[k * kLanesCL + lane]);
    partial[blockIdx.y * C + c] = acc;
  }
}

template <typename T, typename Acc>
__global__ void finalize(const Acc* partial, int64_t splits, int64_t C, T* out0, T* out1) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  Acc acc;
  for (int64_t k = 0; k < splits; ++k) acc.merge(partial[k * C + c]);
  acc.write(out0, out1, c);
}

int64_t row_splits(int64_t columns, int64_t rows) {
  int device = 0;
  int sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted = (4 * static_cast<int64_t>(sms) + columns - 1) / columns;
  return std::max<int64_t>(1, std::min<int64_t>({wanted, rows, 65535}));
}

// Reduces x (and dy) per channel into out0/out1 (opmath, (C,)) with accumulator Acc; GradAcc
// also writes the gated dy into `gated` where it is defined.
template <typename scalar_t, template <typename> class AccT>
void reduce(const at::Tensor& dy, const Gate& gate, const at::Tensor& x, const Layout& l,
            const at::Tensor& center, const at::Tensor& out0, const at::Tensor& out1,
            const at::Tensor& gated = at::Tensor()) {
  using T = at::opmath_type<scalar_t>;
  using Acc = AccT<T>;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* dyp = dy.defined() ? dy.const_data_ptr<scalar_t>() : nullptr;
  const auto gp = gate_view<scalar_t>(gate);
  const T* cp = center.defined() ? center.const_data_ptr<T>() : nullptr;
  scalar_t* gated_ptr = gated.defined() ? gated.data_ptr<scalar_t>() : nullptr;
  const int64_t C = l.C;
  int64_t splits;
  at::Tensor partial;
  if (!l.channels_last) {
    splits = row_splits(C, (l.N * l.S + kPositionsPerBlock - 1) / kPositionsPerBlock);
    partial = at::empty({static_cast<int64_t>(splits * C * sizeof(Acc))}, x.options().dtype(at::kByte));
    auto* out = reinterpret_cast<Acc*>(partial.data_ptr());
    if (cuda::fits_int32(l.N * l.S)) {
      reduce_cf<scalar_t, Acc, uint32_t><<<dim3(C, splits), cuda::kThreads, 0, stream>>>(
          dyp, gp, xp, gated_ptr, static_cast<uint32_t>(l.N), C, Divider<uint32_t>(l.S), cp, out);
    } else {
      reduce_cf<scalar_t, Acc, uint64_t><<<dim3(C, splits), cuda::kThreads, 0, stream>>>(
          dyp, gp, xp, gated_ptr, static_cast<uint64_t>(l.N), C, Divider<uint64_t>(l.S), cp, out);
    }
  } else {
    const int64_t rows = l.N * l.S;
    const int64_t tiles = (C + kLanesCL - 1) / kLanesCL;
    splits = row_splits(tiles, (rows + kRowsCL - 1) / kRowsCL);
    partial = at::empty({static_cast<int64_t>(splits * C * sizeof(Acc))}, x.options().dtype(at::kByte));
    reduce_cl<scalar_t, Acc><<<dim3(tiles, splits), kLanesCL * kRowsCL, 0, stream>>>(
        dyp, gp, xp, gated_ptr, rows, C, cp, reinterpret_cast<Acc*>(partial.data_ptr()));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finalize<T, Acc><<<(C + cuda::kThreads - 1) / cuda::kThreads, cuda::kThreads, 0, stream>>>(
      reinterpret_cast<const Acc*>(partial.data_ptr()), splits, C, out0.data_ptr<T>(), out1.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void moments_cuda(const at::Tensor& x, const Layout& l, const at::Tensor& mean, const at::Tensor& var) {
  c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modekernels_bn_moments", [&] {
    reduce<scalar_t, MomentsAcc>(at::Tensor(), Gate(), x, l, at::Tensor(), mean, var);
  });
}

void grad_sums_cuda(const at::Tensor& dy, const Gate& gate, const at::Tensor& x, const Layout& l,
                    const at::Tensor& mean, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                    const at::Tensor& gated) {
  c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "modekernels_bn_grad_sums", [&] {
    reduce<scalar_t, GradAcc>(dy, gate, x, l, mean, sum_dy, sum_dy_xmu, gated);
  });
}

// ------------------------------------------------------------------------------- affine

// Vector v of kVec elements: one 16-byte access when kVec > 1, a plain element otherwise.
template <int kVec, typename scalar_t, typename index_t>
__device__ __forceinline__ void load(const scalar_t* src, index_t v, cuda::Vec<scalar_t, kVec>& dst) {
  if constexpr (kVec == 1) {
    dst.v[0] = src[v];
  } else {
    dst = reinterpret_cast<const cuda::Vec<scalar_t, kVec>*>(src)[v];
  }
}

template <int kVec, typename scalar_t, typename index_t>
__device__ __forceinline__ void store(scalar_t* dst, index_t v, const cuda::Vec<scalar_t, kVec>& src) {
  if constexpr (kVec == 1) {
    dst[v] = src.v[0];
  } else {
    reinterpret_cast<cuda::Vec<scalar_t, kVec>*>(dst)[v] = src;
  }
}

// Each thread of a grid-stride loop takes kVec consecutive elements: with kVec > 1 (the innermost
// dimension, S or C, a multiple of kVec and 16-byte aligned pointers) as 128-bit loads and stores,
// all in one channel (channels-first) or in kVec consecutive channels (channels-last), so the
// channel is found once per vector.
// kFused: gate, residual, relu and gated_out are looked at (the plain BatchNorm passes skip them).
template <typename scalar_t, typename index_t, int kVec, bool kHasP, bool kHasQ, bool kFused>
__global__ void __launch_bounds__(cuda::kThreads)
    affine_kernel(AffinePtrs<scalar_t> in, index_t nvec, Divider<index_t> s_div,
                  Divider<index_t> c_div, bool channels_last,
                  const at::opmath_type<scalar_t>* coeffs, scalar_t* out) {
  using T = at::opmath_type<scalar_t>;
  using V = cuda::Vec<scalar_t, kVec>;
  const index_t C = c_div.divisor;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t v = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += stride) {
    const index_t first = v * kVec;
    const index_t c0 = channels_last ? c_div.mod(first) : c_div.mod(s_div.div(first));
    V pv, qv, gv, rv, ov, go;
    if constexpr (kHasP) load<kVec>(in.p, v, pv);
    if constexpr (kHasQ) load<kVec>(in.q, v, qv);
    if constexpr (kFused) {
      if (in.gate.g) load<kVec>(in.gate.g, v, gv);
      if (in.residual) load<kVec>(in.residual, v, rv);
    }
    MK_UNROLL
    for (int k = 0; k < kVec; ++k) {
      const index_t c = channels_last ? c0 + k : c0;
      T r;
      if constexpr (kHasP) {
        const bool open = !kFused || !in.gate.g || in.gate.passes(static_cast<T>(gv.v[k]), c);
        const T g = open ? static_cast<T>(pv.v[k]) : T(0);
        if constexpr (kFused) go.v[k] = static_cast<scalar_t>(g);
        r = coeffs[kD * C + c] + g * coeffs[kA * C + c];
        if constexpr (kHasQ) r += (static_cast<T>(qv.v[k]) - coeffs[kM * C + c]) * coeffs[kB * C + c];
      } else {  // what a recomputed gate recomputes
        r = normalized(static_cast<T>(qv.v[k]), coeffs[kM * C + c], coeffs[kB * C + c], coeffs[kD * C + c]);
      }
      if constexpr (kFused) {
        if (in.residual) r += static_cast<T>(rv.v[k]);
        if (in.relu && r < T(0)) r = T(0);  // NaN stays NaN, as in torch.relu
      }
      ov.v[k] = static_cast<scalar_t>(r);
    }
    store<kVec>(out, v, ov);
    if constexpr (kFused && kHasP) {
      if (in.gated_out) store<kVec>(in.gated_out, v, go);
    }
  }
}

template <typename scalar_t, typename index_t, int kVec, bool kFused>
void launch_affine(const AffinePtrs<scalar_t>& in, const Layout& l, int64_t n,
                   const at::opmath_type<scalar_t>* coeffs, scalar_t* out) {
  const int64_t nvec = n / kVec;
  const auto grid = cuda::grid_size(nvec);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Divider<index_t> s_div(static_cast<index_t>(l.S));
  const Divider<index_t> c_div(static_cast<index_t>(l.C));
  const auto nv = static_cast<index_t>(nvec);
  if (in.p && in.q) {
    affine_kernel<scalar_t, index_t, kVec, true, true, kFused><<<grid, cuda::kThreads, 0, stream>>>(
        in, nv, s_div, c_div, l.channels_last, coeffs, out);
  } else if (in.p) {
    affine_kernel<scalar_t, index_t, kVec, true, false, kFused><<<grid, cuda::kThreads, 0, stream>>>(
        in, nv, s_div, c_div, l.channels_last, coeffs, out);
  } else {
    affine_kernel<scalar_t, index_t, kVec, false, true, kFused><<<grid, cuda::kThreads, 0, stream>>>(
        in, nv, s_div, c_div, l.channels_last, coeffs, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t, int kVec>
void launch_affine(const AffinePtrs<scalar_t>& in, const Layout& l, int64_t n,
                   const at::opmath_type<scalar_t>* coeffs, scalar_t* out) {
  if (in.gate.g || in.residual || in.relu || in.gated_out) {
    launch_affine<scalar_t, index_t, kVec, true>(in, l, n, coeffs, out);
  } else {
    launch_affine<scalar_t, index_t, kVec, false>(in, l, n, coeffs, out);
  }
}

template <typename scalar_t, typename index_t>
void launch_affine(const AffinePtrs<scalar_t>& in, const Layout& l, int64_t n,
                   const at::opmath_type<scalar_t>* coeffs, scalar_t* out) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t inner = l.channels_last ? l.C : l.S;
  auto fits = [](const scalar_t* operand) { return !operand || cuda::aligned16(operand); };
  const bool vectorize = inner % kVec == 0 && cuda::aligned16(out) && fits(in.p) && fits(in.q) &&
                         fits(in.gate.g) && fits(in.residual) && fits(in.gated_out);
  if (vectorize) {
    launch_affine<scalar_t, index_t, kVec>(in, l, n, coeffs, out);
  } else {
    launch_affine<scalar_t, index_t, 1>(in, l, n, coeffs, out);
  }
}

void affine_cuda(const Operands& in, const Layout& l, const at::Tensor& coeffs, const at::Tensor& out) {
  c10::cuda::CUDAGuard guard(out.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "modekernels_bn_affine", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto ptrs = affine_ptrs<scalar_t>(in);
    const int64_t n = out.numel();
    if (cuda::fits_int32(n)) {
      launch_affine<scalar_t, uint32_t>(ptrs, l, n, coeffs.const_data_ptr<T>(), out.data_ptr<scalar_t>());
    } else {
      launch_affine<scalar_t, uint64_t>(ptrs, l, n, coeffs.const_data_ptr<T>(), out.data_ptr<scalar_t>());
    }
  });
}

// -------------------------------------------------------------------------- per channel

unsigned int channel_blocks(int64_t C) {
  return static_cast<unsigned int>(std::max<int64_t>(1, (C + cuda::kThreads - 1) / cuda::kThreads));
}

template <typename T, typename P>
__global__ void forward_coeffs_kernel(int64_t C, const T* mean, const T* var, const P* weight,
                                      const P* bias, double eps, T* coeffs) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < C) forward_coeffs<T, P>(c, C, mean, var, weight, bias, eps, coeffs);
}

template <typename T, typename P>
__global__ void backward_coeffs_kernel(int64_t C, bool train, const T* mean, const T* var,
                                       const P* weight, double eps, const T* sum_dy,
                                       const T* sum_dy_xmu, T count, T* coeffs, P* grad_weight,
                                       P* grad_bias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < C) {
    backward_coeffs<T, P>(c, C, train, mean, var, weight, eps, sum_dy, sum_dy_xmu, count, coeffs,
                          grad_weight, grad_bias);
  }
}

template <typename T, typename P>
__global__ void update_running_kernel(int64_t C, const T* mean, const T* var, T count, double factor,
                                      const int64_t* num_batches_tracked, P* running_mean,
                                      P* running_var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const T f = num_batches_tracked ? T(1) / static_cast<T>(*num_batches_tracked) : static_cast<T>(factor);
  update_running<T, T, P>(c, mean, var, count, f, running_mean, running_var);
}

void forward_coeffs_cuda(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& weight,
                         const at::Tensor& bias, double eps, const at::Tensor& coeffs) {
  c10::cuda::CUDAGuard guard(mean.device());
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "modekernels_bn_forward_coeffs", [&] {
    using T = scalar_t;
    dispatch_param(weight.defined() ? weight : bias, mean.scalar_type(), [&](auto tag) {
      using P = std::remove_pointer_t<decltype(tag)>;
      const int64_t C = mean.numel();
      forward_coeffs_kernel<T, P><<<channel_blocks(C), cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          C, mean.const_data_ptr<T>(), var.const_data_ptr<T>(), ptr_or_null<P>(weight),
          ptr_or_null<P>(bias), eps, coeffs.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void backward_coeffs_cuda(bool train, const at::Tensor& mean, const at::Tensor& var,
                          const at::Tensor& weight, double eps, const at::Tensor& sum_dy,
                          const at::Tensor& sum_dy_xmu, int64_t count, const at::Tensor& coeffs,
                          const at::Tensor& grad_weight, const at::Tensor& grad_bias) {
  c10::cuda::CUDAGuard guard(mean.device());
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "modekernels_bn_backward_coeffs", [&] {
    using T = scalar_t;
    dispatch_param(weight.defined() ? weight : grad_bias, mean.scalar_type(), [&](auto tag) {
      using P = std::remove_pointer_t<decltype(tag)>;
      const int64_t C = mean.numel();
      backward_coeffs_kernel<T, P><<<channel_blocks(C), cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          C, train, mean.const_data_ptr<T>(), var.const_data_ptr<T>(), ptr_or_null<P>(weight), eps,
          sum_dy.const_data_ptr<T>(), sum_dy_xmu.const_data_ptr<T>(), static_cast<T>(count),
          coeffs.data_ptr<T>(), ptr_or_null<P>(grad_weight), ptr_or_null<P>(grad_bias));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void update_running_cuda(const at::Tensor& running_mean, const at::Tensor& running_var,
                         const at::Tensor& mean, const at::Tensor& var, int64_t count, double factor,
                         const at::Tensor& num_batches_tracked) {
  c10::cuda::CUDAGuard guard(mean.device());
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "modekernels_bn_update", [&] {
    using T = scalar_t;
    dispatch_param(running_mean, mean.scalar_type(), [&](auto tag) {
      using P = std::remove_pointer_t<decltype(tag)>;
      const int64_t C = mean.numel();
      update_running_kernel<T, P><<<channel_blocks(C), cuda::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          C, mean.const_data_ptr<T>(), var.const_data_ptr<T>(), static_cast<T>(count), factor,
          num_batches_tracked.defined() ? num_batches_tracked.const_data_ptr<int64_t>() : nullptr,
          running_mean.data_ptr<P>(), running_var.data_ptr<P>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

const Backend kCuda = {moments_cuda,         grad_sums_cuda, forward_coeffs_cuda,
                       backward_coeffs_cuda, affine_cuda,    update_running_cuda,
                       nullptr,              nullptr};

}  // namespace

TORCH_LIBRARY_IMPL(modekernels, CUDA, m) {
  Ops<kCuda>::register_all(m);
}

}  // namespace modekernels::batch_norm

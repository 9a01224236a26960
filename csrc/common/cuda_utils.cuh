// Launch helpers shared by every CUDA kernel file: grid sizing from the device and aligned vectors.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace modekernels::cuda {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `work` items: enough to fill every SM, no more.
inline unsigned int grid_size(int64_t work, int threads = kThreads) {
  int device = 0;
  int sms = 0;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  const int64_t wanted = (work + threads - 1) / threads;
  const int64_t full = static_cast<int64_t>(sms) * (per_sm / threads);
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(wanted, full)));
}

inline bool fits_int32(int64_t n) {
  return n <= std::numeric_limits<int32_t>::max();
}

inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// N elements moved as one 16-byte-aligned unit (one or two 128-bit loads or stores).
template <typename T, int N>
struct alignas(16) Vec {
  T v[N];
};

}  // namespace modekernels::cuda

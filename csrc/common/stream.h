// Non-temporal ("streaming") stores for the CPU kernels' large outputs.
//
// An ordinary store first reads the line it writes (a read for ownership), and the line goes back
// to memory later: a written tensor that is not in cache costs two transfers, not one. A
// non-temporal store writes whole lines to memory once, with no read, and leaves nothing in cache.
// So the BatchNorm passes and channel-wise dropout stream outputs far larger than the caches, as
// oneDNN's BatchNorm streams its float32 outputs. In a model of BatchNormAddReLU's gradient-sums
// pass (benchmarks/loop_models/streaming_stores.cpp: float32, 8x56x56 rows of 256 channels, 2
// threads; Intel Xeon VM, 2026-12-06) reading dy, x and y took 1.5-1.7 ms, and writing the gated
// dy too 3.1-3.8 ms with ordinary stores, 1.8-2.0 ms streamed; with the elementwise pass after it,
// which then reads the gated dy from memory, 5.0-5.8 ms against 3.6-4.1 ms.
//
// Outputs keep ordinary stores (streams()):
// - under stream_bytes(), 16 MB: with them a layer's tensors stay in the last-level cache, where
//   the next pass finds what this one wrote (BatchNormAddReLU2d's float32 training step over
//   channels-last memory: 5-15% slower streamed at 8x64x56x56, 6.4 MB a tensor; level to 10%
//   faster at 8x512x28x28 and 4x256x56x56, 12.8 MB; 15-25% faster at 8x256x56x56, 25.7 MB);
// - on pages never touched, as glibc maps them afresh for every allocation of 32 MB or more: the
//   kernel zeroes each page as the first store reaches it, which leaves its lines in cache, where
//   ordinary stores are cheap and non-temporal ones must evict them first (the same step at
//   16x256x56x56 measured 10-35% slower streamed).
// A pass streams float32 and float64 results by computing a span of them into a buffer in L1 and
// copying it out with stream_span; float16 and bfloat16 ones, which staged loops narrow from
// float spans, go out as they are narrowed (staged.h's narrow_block). It calls
// stream_fence() before its task ends, as the stores are weakly ordered.
//
// The functions of namespace MK_CPU_ISA are the including build's (staged.h).
#pragma once

#include "common/cpu_capability.h"
#include "common/staged.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#ifdef MK_CPU_AVX2
#include <immintrin.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace modekernels {

// The smallest output streamed: 16 MB, or the environment's MODEKERNELS_STREAM_BYTES (a number of
// bytes), read once, as the extension is imported (ops.cpp: a ValueError there if it is not a
// number of bytes). Machines whose last-level cache is larger than this VM's (about 64 MB in
// effect; 480 MB reported) may want more.
inline int64_t stream_bytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("MODEKERNELS_STREAM_BYTES");
    if (!env || !*env) return int64_t{16} << 20;
    char* end = nullptr;
    const long long value = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(*end == '\0' && value >= 0, "MODEKERNELS_STREAM_BYTES must be a number of ",
                      "bytes (a non-negative integer), got '", env, "'");
    return static_cast<int64_t>(value);
  }();
  return bytes;
}

// Whether a kernel streams `out` (a dense tensor it is about to write): on x86-64 Linux, where it
// takes stream_bytes() or more and the page at its middle is mapped already (mincore), as memory
// that the allocator hands out again is.
inline bool streams(const at::Tensor& out) {
#if defined(MK_CPU_AVX2) && defined(__linux__)
  const int64_t bytes = out.numel() * static_cast<int64_t>(out.element_size());
  if (bytes < stream_bytes()) return false;
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t middle = reinterpret_cast<uintptr_t>(out.data_ptr()) + static_cast<uintptr_t>(bytes / 2);
  void* const middle_page = reinterpret_cast<void*>(middle & ~(page - 1));
  unsigned char resident = 0;
  return mincore(middle_page, page, &resident) == 0 && (resident & 1);
#else
  return false;
#endif
}

namespace MK_CPU_ISA {

// The bytes of `bits` (8, 16, 32 or 64 of them; 32 from the AVX2 build on, 64 in the AVX-512
// one) stored at dst, which is aligned to their size, past the caches.
template <typename Bits>
MK_ISA_INLINE void stream_store(void* dst, Bits bits) {
#ifdef MK_CPU_AVX2
  constexpr size_t kBytes = sizeof(Bits);
#if MK_CPU_ISA_LEVEL >= 2
  if constexpr (kBytes == 64) {
    _mm512_stream_si512(static_cast<__m512i*>(dst), __builtin_bit_cast(__m512i, bits));
    return;
  }
#endif
#if MK_CPU_ISA_LEVEL >= 1
  if constexpr (kBytes == 32) {
    _mm256_stream_si256(static_cast<__m256i*>(dst), __builtin_bit_cast(__m256i, bits));
    return;
  }
#endif
  if constexpr (kBytes == 16) {
    _mm_stream_si128(static_cast<__m128i*>(dst), __builtin_bit_cast(__m128i, bits));
  } else if constexpr (kBytes == 8) {
    _mm_stream_si64(static_cast<long long*>(dst), __builtin_bit_cast(long long, bits));
  } else {
    static_assert(kBytes == 64 || kBytes == 32, "a vector of the build");
  }
#else
  std::memcpy(dst, &bits, sizeof(Bits));
#endif
}

// Whether p is aligned to `bytes`.
inline bool aligned_to(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// n values from src (a buffer in L1) to dst: the build's whole aligned vectors with stream_store,
// the elements before and after them with ordinary stores.
template <typename scalar_t>
MK_ISA_INLINE void stream_span(scalar_t* dst, const scalar_t* src, int64_t n) {
  constexpr int64_t W = kVectorBytes / sizeof(scalar_t);
  typedef int64_t Vector __attribute__((vector_size(kVectorBytes)));
  int64_t i = 0;
  for (; i < n && !aligned_to(dst + i, kVectorBytes); ++i) dst[i] = src[i];
  for (; i + W <= n; i += W) {
    Vector v;
    std::memcpy(&v, src + i, sizeof(v));
    stream_store(dst + i, v);
  }
  for (; i < n; ++i) dst[i] = src[i];
}

// Orders this thread's streaming stores before what it does next (its task's end).
MK_ISA_INLINE void stream_fence() {
#ifdef MK_CPU_AVX2
  _mm_sfence();
#endif
}

}  // namespace MK_CPU_ISA
}  // namespace modekernels

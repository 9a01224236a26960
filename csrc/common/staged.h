// Float16 and bfloat16 loops staged through float spans, for the AVX2 and AVX-512 builds of the
// CPU kernels (cpu_capability.h). Its contents are the including build's own (namespace
// MK_CPU_ISA, compiled for that build's target).
//
// A loop written element by element converts with convert.h's integer operations, which the
// compiler vectorizes: for float16 about a dozen per value (GCC does not vectorize F16C's
// conversions), for bfloat16 a shift to widen and about a dozen to round back (GCC's loop for
// BatchNorm's eval pass: 40 instructions per 16 values, bound by their issue, not by memory).
// In the AVX2 and AVX-512 builds such a loop works on spans of kStagedSpan values instead:
// widen_block converts a span of operands into float copies (eight values per F16C instruction,
// sixteen with AVX-512; bfloat16 by zero-extension and a shift), the loop runs on floats, and
// narrow_block converts its results back (float16: F16C; bfloat16 with AVX2: seven instructions
// per eight values, then one pack per sixteen; with AVX-512: AVX512-BF16's conversion and a test
// for NaNs and subnormals, three instructions per sixteen). A full span runs with its size as a
// compile-time constant (FullSpan): the compiler then keeps the copies in registers and turns the
// three loops into one (loads and conversions, arithmetic, conversions and stores). BatchNorm's
// elementwise passes stage both dtypes; its channels-last reductions, which only read, convert
// float16 in registers instead (batch_norm_cpu.cpp, reads_parts), and bfloat16's widening
// vectorizes in place.
// BlockIn and BlockOut wrap this for a loop written once for every dtype (dropout): staged where
// staged_span, otherwise reading and writing memory through widen and narrow as a plain loop
// would. Both give widen's and narrow's bits: F16C and AVX512-BF16 round to nearest even, as
// narrow does, and NaNs are stored as narrow stores them (float16 0x7E00 with the sign, bfloat16
// 0x7FC0).
// On the development machine (AMD EPYC, 8x256x56x56; AVX2 build) staging made float16 BatchNorm
// 1.3-4x faster and float16 dropout's passes 1.6-4.7x; spans of 32 known at compile time instead
// of buffers of 256 or 512 then made float16 BatchNorm eval 1.2-1.5x faster again, and Dropout2d
// and dropout_add 1.3-1.5x. Staging bfloat16 made its BatchNorm passes 1.05-1.3x faster
// (eval 1.2-1.3x) and its Dropout2d and add passes 1.15-1.25x.
#pragma once

#include "common/convert.h"
#include "common/cpu_capability.h"

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

// The conversions and the staged blocks' members are always inlined, and compiled for the
// build's target: out of line, each span of 32 values costs a call, and GCC's own choice varies
// with the caller (float16 dropout_add measured 1.3-1.8x slower where widen_block was left out of
// line).
#if MK_CPU_ISA_LEVEL >= 1
#include <immintrin.h>
#define MK_ISA_INLINE __attribute__((target(MK_CPU_ISA_TARGET_LIST), always_inline)) inline
#else
#define MK_ISA_INLINE __attribute__((always_inline)) inline
#endif

namespace modekernels::MK_CPU_ISA {

// The bytes of the build's SIMD vectors: 16 (baseline ISA), 32 (AVX2), 64 (AVX-512).
constexpr int64_t kVectorBytes = int64_t{16} << MK_CPU_ISA_LEVEL;

#if MK_CPU_ISA_LEVEL >= 2
// Every lane: the AVX-512 conversions and shifts below are the masked forms, as GCC 12's unmasked
// _mm512_cvtph_ps, _mm512_cvtps_ph, _mm512_cvtepu16_epi32 and its shifts draw
// -Wmaybe-uninitialized warnings from their own header (GCC bug 105593).
constexpr __mmask16 kAll16 = 0xffff;
#endif

// dst[i] = src[i] in float, i < n. Element by element in the baseline build.
MK_ISA_INLINE void widen_block(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if MK_CPU_ISA_LEVEL >= 2
  for (; i < (n & ~int64_t{15}); i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_maskz_cvtph_ps(kAll16, h));
  }
#endif
#if MK_CPU_ISA_LEVEL >= 1
  for (; i < (n & ~int64_t{7}); i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = widen<float>(src[i]);
}

#if MK_CPU_ISA_LEVEL >= 2
// Sixteen floats rounded to float16 as narrow rounds them. F16C keeps a NaN's upper payload bits;
// narrow (and c10) store the plain quiet NaN with its sign, which those lanes (rare: a branch the
// CPU predicts) take instead: float16 BatchNorm eval on 64x256x7x7 took 3-4% longer with the fix-up
// (a masked move) on every vector.
MK_ISA_INLINE __m256i half_bits16(__m512 v) {
  __m256i bits = _mm512_maskz_cvtps_ph(kAll16, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  if (__builtin_expect(nan != 0, 0)) {
    const __m256i quiet = _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi16(int16_t(0x8000))),
                                          _mm256_set1_epi16(0x7e00));
    bits = _mm256_mask_mov_epi16(bits, nan, quiet);
  }
  return bits;
}
#endif

// dst[i] = src[i] rounded to float16, i < n.
MK_ISA_INLINE void narrow_block(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#if MK_CPU_ISA_LEVEL >= 2
  for (; i < (n & ~int64_t{15}); i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), half_bits16(_mm512_loadu_ps(src + i)));
  }
#elif MK_CPU_ISA_LEVEL >= 1
  // As above, the fix-up after the loop, reading the stored bits, not src, so that a caller's src
  // can stay in registers.
  __m256 nan = _mm256_setzero_ps();
  for (; i < (n & ~int64_t{7}); i += 8) {
    const __m256 v = _mm256_loadu_ps(src + i);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  if (!_mm256_testz_ps(nan, nan)) {
    for (int64_t k = 0; k < i; ++k) {
      if ((dst[k].x & 0x7fff) > 0x7c00) dst[k].x = (dst[k].x & 0x8000) | 0x7e00;
    }
  }
#endif
  for (; i < n; ++i) dst[i] = narrow<c10::Half>(src[i]);
}

// dst[i] = src[i] in float, i < n: the bits in the upper half.
MK_ISA_INLINE void widen_block(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if MK_CPU_ISA_LEVEL >= 2
  for (; i < (n & ~int64_t{15}); i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m512i w = _mm512_maskz_slli_epi32(kAll16, _mm512_maskz_cvtepu16_epi32(kAll16, h), 16);
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(w));
  }
#endif
#if MK_CPU_ISA_LEVEL >= 1
  for (; i < (n & ~int64_t{7}); i += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
#endif
  for (; i < n; ++i) dst[i] = widen<float>(src[i]);
}

#if MK_CPU_ISA_LEVEL >= 1
// Eight floats rounded to bfloat16 as narrow rounds them (to nearest even: add 0x7FFF and the
// lowest kept bit, drop the low half; NaN is 0x7FC0), in the low halves of 32-bit lanes.
MK_ISA_INLINE __m256i bfloat16_bits8(__m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  const __m256i up = _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  const __m256 quiet_nan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000));
  const __m256 r = _mm256_blendv_ps(_mm256_castsi256_ps(up), quiet_nan, nan);
  return _mm256_srli_epi32(_mm256_castps_si256(r), 16);
}
#endif

#if MK_CPU_ISA_LEVEL >= 2
// Sixteen floats rounded to bfloat16 as narrow rounds them. AVX512-BF16's conversion rounds to
// nearest even but treats subnormal inputs as zero and keeps NaN payloads, so those lanes (rare:
// a branch the CPU predicts) take narrow's integer rounding and quiet NaN instead, computed from
// the register: a fix-up that read the floats from memory made the compiler store every staged
// span's results to the stack (bfloat16 BatchNorm's elementwise passes spent a third of their
// time around it).
MK_ISA_INLINE __m256i bfloat16_bits16(__m512 v) {
  __m256i bits = (__m256i)_mm512_cvtneps_pbh(v);
  constexpr int kNanOrSubnormal = 0x01 | 0x20 | 0x80;  // quiet NaN, subnormal, signalling NaN
  const __mmask16 special = _mm512_fpclass_ps_mask(v, kNanOrSubnormal);
  if (__builtin_expect(special != 0, 0)) {
    const __m512i x = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_maskz_srli_epi32(kAll16, x, 16), _mm512_set1_epi32(1));
    __m512i up = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7fff)), lsb);
    up = _mm512_mask_mov_epi32(up, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
    bits = _mm512_mask_cvtepi32_epi16(bits, special, _mm512_maskz_srli_epi32(kAll16, up, 16));
  }
  return bits;
}
#endif

// dst[i] = src[i] rounded to bfloat16, i < n; sixteen values at a time (with AVX2 per pack, which
// keeps 128-bit halves apart, hence the permute).
MK_ISA_INLINE void narrow_block(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
#if MK_CPU_ISA_LEVEL >= 2
  for (; i < (n & ~int64_t{15}); i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), bfloat16_bits16(_mm512_loadu_ps(src + i)));
  }
#elif MK_CPU_ISA_LEVEL >= 1
  for (; i < (n & ~int64_t{15}); i += 16) {
    const __m256i lo = bfloat16_bits8(_mm256_loadu_ps(src + i));
    const __m256i hi = bfloat16_bits8(_mm256_loadu_ps(src + i + 8));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xd8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), packed);
  }
#endif
  for (; i < n; ++i) dst[i] = narrow<c10::BFloat16>(src[i]);
}

// Whether a loop over scalar_t stages its spans: float16 and bfloat16, outside the baseline build.
template <typename scalar_t>
inline constexpr bool staged_span =
    MK_CPU_ISA_LEVEL >= 1 && (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>);

// The values a staged loop converts at a time: four float vectors per operand with AVX2, two with
// AVX-512.
inline constexpr int64_t kStagedSpan = 32;

// A full span's size as a compile-time constant.
using FullSpan = std::integral_constant<int64_t, kStagedSpan>;

// fn(i, n) for the spans [i, i + n) of [begin, end), n <= span; where a loop over scalar_t stages
// it, every full span of kStagedSpan values is given as FullSpan. It carries the build's target,
// since GCC does not inline a body compiled for AVX2 (the caller's fn) into a function compiled
// for less. Span bodies are declared MK_SPAN_BODY: out of line, each span of 32 values costs a
// call (float16 BatchNorm eval measured 1.2x slower, channels-last training 1.3x).
#define MK_SPAN_BODY __attribute__((always_inline))

template <typename scalar_t, typename Fn>
MK_ISA_INLINE void for_spans(int64_t begin, int64_t end, int64_t span, const Fn& fn) {
  int64_t i = begin;
  if constexpr (staged_span<scalar_t>) {
    for (; i + kStagedSpan <= end; i += kStagedSpan) fn(i, FullSpan{});
  }
  for (; i < end; i += span) fn(i, std::min(span, end - i));
}

// for_spans for a loop whose results never alias its operands (BatchNorm's elementwise passes
// write fresh tensors), which may then compute an element twice: where staged, a range of
// kStagedSpan values or more ends with a full span that overlaps the one before it rather than
// with a shorter span, whose length the compiler does not know (scalar conversions, a loop with
// a remainder). BatchNorm eval on 64x256x7x7 (rows of one full span and 17 values; AVX-512 build,
// in turns with torch): float16 from 0.46-0.48x of torch's speed to 0.61-0.64x, bfloat16 from
// 0.62-0.68x to 0.76-0.85x.
template <typename scalar_t, typename Fn>
MK_ISA_INLINE void for_spans_overlapping(int64_t begin, int64_t end, int64_t span, const Fn& fn) {
  if constexpr (staged_span<scalar_t>) {
    if (end - begin >= kStagedSpan) {
      int64_t i = begin;
      for (; i + kStagedSpan <= end; i += kStagedSpan) fn(i, FullSpan{});
      if (i < end) fn(end - kStagedSpan, FullSpan{});
      return;
    }
  }
  for_spans<scalar_t>(begin, end, span, fn);
}

// narrow_block, past the caches where `stream` (an output that streams, common/stream.h): in the
// AVX-512 build a full span of float16 or bfloat16 whose dst starts a line is narrowed in
// registers and written as one non-temporal 64-byte store; anything else as narrow_block stores
// it. (Narrowed to memory and copied out by stream_span, each line was read back from two 32-byte
// stores just made, and BatchNormAddReLU2d's channels-last training step took 1.2-1.5x as long as
// with ordinary stores. The AVX2 build's two 32-byte stores a span measured both ways, bfloat16
// BatchNormAddReLU2d 0.8x: benchmarks/TUNING.md.)
template <typename scalar_t, typename N>
MK_ISA_INLINE void narrow_block(const float* src, scalar_t* dst, N n, bool stream) {
#if MK_CPU_ISA_LEVEL >= 2
  if constexpr (std::is_same_v<N, FullSpan>) {
    if (stream && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
      __m256i lo, hi;
      if constexpr (std::is_same_v<scalar_t, c10::Half>) {
        lo = half_bits16(_mm512_loadu_ps(src));
        hi = half_bits16(_mm512_loadu_ps(src + 16));
      } else {
        lo = bfloat16_bits16(_mm512_loadu_ps(src));
        hi = bfloat16_bits16(_mm512_loadu_ps(src + 16));
      }
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
      return;
    }
  }
#endif
  narrow_block(src, dst, n);
}

// n values of scalar_t at src, as (*this)[i] in opmath; n <= kStagedSpan where staged (the
// specialization below).
template <typename scalar_t>
class BlockIn {
 public:
  BlockIn(const scalar_t* src, int64_t) : src_(src) {}
  at::opmath_type<scalar_t> operator[](int64_t i) const { return widen<at::opmath_type<scalar_t>>(src_[i]); }

 private:
  const scalar_t* src_;
};

template <typename scalar_t>
  requires staged_span<scalar_t>
class BlockIn<scalar_t> {
 public:
  MK_ISA_INLINE BlockIn(const scalar_t* src, int64_t n) { widen_block(src, buf_, n); }
  float operator[](int64_t i) const { return buf_[i]; }

 private:
  alignas(64) float buf_[kStagedSpan];
};

// n values of scalar_t for dst: set(i, v) for each, then store(n), which stores the staged values
// (unstaged ones are in memory already); n <= kStagedSpan where staged.
template <typename scalar_t>
class BlockOut {
 public:
  explicit BlockOut(scalar_t* dst) : dst_(dst) {}
  void set(int64_t i, at::opmath_type<scalar_t> v) { dst_[i] = narrow<scalar_t>(v); }
  void store(int64_t, bool = false) {}

 private:
  scalar_t* dst_;
};

template <typename scalar_t>
  requires staged_span<scalar_t>
class BlockOut<scalar_t> {
 public:
  explicit BlockOut(scalar_t* dst) : dst_(dst) {}
  void set(int64_t i, float v) { buf_[i] = v; }
  template <typename N>
  MK_ISA_INLINE void store(N n, bool stream = false) { narrow_block(buf_, dst_, n, stream); }

 private:
  scalar_t* dst_;
  alignas(64) float buf_[kStagedSpan] = {};  // set() fills what store() reads; GCC cannot tell
};

}  // namespace modekernels::MK_CPU_ISA

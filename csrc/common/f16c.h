// Float16 loops staged through F16C, for the AVX2 build of the CPU kernels (cpu_capability.h).
//
// A loop written element by element converts float16 with convert.h's integer operations, about
// a dozen per value even where the compiler vectorizes them, since GCC does not vectorize F16C's
// conversions. In the AVX2 build a loop over float16 works on spans of kStagedSpan values
// instead: widen_block converts a span of operands into float copies, eight values per F16C
// instruction, the loop runs on floats, and narrow_block converts its results back (BatchNorm's
// elementwise passes and channels-last reductions). A full span runs with its size as a
// compile-time constant (FullSpan): the compiler then keeps the copies in registers and turns the
// three loops into one (loads and conversions, arithmetic, conversions and stores).
// BlockIn and BlockOut wrap this for a loop written once for every dtype (dropout): staged for
// float16 where kF16C, otherwise reading and writing memory through widen and narrow as a plain
// loop would. Both give widen's and narrow's bits: F16C rounds to nearest even, as narrow does,
// and NaNs are stored as narrow stores them (0x7E00 with the sign). On the development machine
// (AMD EPYC, 8x256x56x56) staging made float16 BatchNorm 1.3-4x faster and float16 dropout's
// passes 1.6-4.7x; spans of 32 known at compile time instead of buffers of 256 or 512 then made
// float16 BatchNorm eval 1.2-1.5x faster again, and Dropout2d and dropout_add 1.3-1.5x.
#pragma once

#include "common/convert.h"
#include "common/cpu_capability.h"

#include <ATen/OpMathType.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

// The conversions and the staged blocks' members are always inlined: out of line, each span of
// 32 values costs a call, and GCC's own choice varies with the caller (float16 dropout_add measured
// 1.3-1.8x slower where widen_block was left out of line).
#ifdef MK_CPU_AVX2
#include <immintrin.h>
#define MK_F16C_INLINE __attribute__((target("avx2,f16c"), always_inline)) inline
#else
#define MK_F16C_INLINE __attribute__((always_inline)) inline
#endif

namespace modekernels {

// dst[i] = src[i] in float, i < n. Element by element where the compiler cannot target F16C.
MK_F16C_INLINE void widen_block(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef MK_CPU_AVX2
  for (; i < (n & ~int64_t{7}); i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = widen<float>(src[i]);
}

// dst[i] = src[i] rounded to float16, i < n.
MK_F16C_INLINE void narrow_block(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#ifdef MK_CPU_AVX2
  __m256 nan = _mm256_setzero_ps();
  for (; i < (n & ~int64_t{7}); i += 8) {
    const __m256 v = _mm256_loadu_ps(src + i);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  // F16C keeps a NaN's upper payload bits; narrow (and c10) store the plain quiet NaN with its
  // sign. The fix-up reads the stored bits, not src, so that a caller's src can stay in registers.
  if (!_mm256_testz_ps(nan, nan)) {
    for (int64_t k = 0; k < i; ++k) {
      if ((dst[k].x & 0x7fff) > 0x7c00) dst[k].x = (dst[k].x & 0x8000) | 0x7e00;
    }
  }
#endif
  for (; i < n; ++i) dst[i] = narrow<c10::Half>(src[i]);
}

// Whether a loop over scalar_t stages its spans: float16 where F16C may be used.
template <typename scalar_t, bool kF16C>
inline constexpr bool f16c_staged = kF16C && std::is_same_v<scalar_t, c10::Half>;

// The values a staged loop converts at a time: four F16C instructions per operand.
inline constexpr int64_t kStagedSpan = 32;

// A full span's size as a compile-time constant.
using FullSpan = std::integral_constant<int64_t, kStagedSpan>;

// fn(i, n) for the spans [i, i + n) of [begin, end), n <= span; where a loop over scalar_t stages
// it, every full span of kStagedSpan values is given as FullSpan. There is one version per build
// (kF16C): the AVX2 build's carries that build's target, since GCC does not inline a body compiled
// for AVX2 (the caller's fn) into a function compiled for the baseline ISA. Span bodies are
// declared MK_SPAN_BODY: out of line, each span of 32 values costs a call (float16 BatchNorm eval
// measured 1.2x slower, channels-last training 1.3x).
#define MK_SPAN_BODY __attribute__((always_inline))

template <typename scalar_t, bool kF16C, typename Fn>
  requires(!kF16C)
inline void for_spans(int64_t begin, int64_t end, int64_t span, const Fn& fn) {
  for (int64_t i = begin; i < end; i += span) fn(i, std::min(span, end - i));
}

template <typename scalar_t, bool kF16C, typename Fn>
  requires kF16C
MK_F16C_INLINE void for_spans(int64_t begin, int64_t end, int64_t span, const Fn& fn) {
  int64_t i = begin;
  if constexpr (f16c_staged<scalar_t, kF16C>) {
    for (; i + kStagedSpan <= end; i += kStagedSpan) fn(i, FullSpan{});
  }
  for (; i < end; i += span) fn(i, std::min(span, end - i));
}

// n values of scalar_t at src, as (*this)[i] in opmath; n <= kStagedSpan where staged (the
// specialization below).
template <typename scalar_t, bool kF16C>
class BlockIn {
 public:
  BlockIn(const scalar_t* src, int64_t) : src_(src) {}
  at::opmath_type<scalar_t> operator[](int64_t i) const { return widen<at::opmath_type<scalar_t>>(src_[i]); }

 private:
  const scalar_t* src_;
};

template <>
class BlockIn<c10::Half, true> {
 public:
  MK_F16C_INLINE BlockIn(const c10::Half* src, int64_t n) { widen_block(src, buf_, n); }
  float operator[](int64_t i) const { return buf_[i]; }

 private:
  alignas(32) float buf_[kStagedSpan];
};

// n values of scalar_t for dst: set(i, v) for each, then store(n), which stores the staged values
// (unstaged ones are in memory already); n <= kStagedSpan where staged.
template <typename scalar_t, bool kF16C>
class BlockOut {
 public:
  explicit BlockOut(scalar_t* dst) : dst_(dst) {}
  void set(int64_t i, at::opmath_type<scalar_t> v) { dst_[i] = narrow<scalar_t>(v); }
  void store(int64_t) {}

 private:
  scalar_t* dst_;
};

template <>
class BlockOut<c10::Half, true> {
 public:
  explicit BlockOut(c10::Half* dst) : dst_(dst) {}
  void set(int64_t i, float v) { buf_[i] = v; }
  MK_F16C_INLINE void store(int64_t n) { narrow_block(buf_, dst_, n); }

 private:
  c10::Half* dst_;
  alignas(32) float buf_[kStagedSpan] = {};  // set() fills what store() reads; GCC cannot tell
};

}  // namespace modekernels

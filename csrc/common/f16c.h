// Float16 loops staged through F16C, for the AVX2 build of the CPU kernels (cpu_capability.h).
//
// A loop written element by element converts float16 with convert.h's integer operations, about
// a dozen per value even where the compiler vectorizes them, since GCC does not vectorize F16C's
// conversions. In the AVX2 build a loop over float16 works on blocks in L1 instead: widen_block
// converts a block of operands into float buffers, eight values per F16C instruction, the loop
// runs on floats, and narrow_block converts its results back (BatchNorm's elementwise passes).
// BlockIn and BlockOut wrap this for a loop written once for every dtype (dropout): staged for
// float16 where kF16C, otherwise reading and writing memory through widen and narrow as a plain
// loop would. Both give widen's and narrow's bits: F16C rounds to nearest even, as narrow does,
// and NaNs are stored as narrow stores them (0x7E00 with the sign). On the development machine
// (AMD EPYC, 8x256x56x56) this made float16 BatchNorm 1.3-4x faster and float16 dropout's
// passes 1.6-4.7x.
#pragma once

#include "common/convert.h"
#include "common/cpu_capability.h"

#include <ATen/OpMathType.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#ifdef MK_CPU_AVX2
#include <immintrin.h>
#define MK_F16C_TARGET __attribute__((target("avx2,f16c")))
#else
#define MK_F16C_TARGET
#endif

namespace modekernels {

// dst[i] = src[i] in float, i < n. Element by element where the compiler cannot target F16C.
MK_F16C_TARGET inline void widen_block(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef MK_CPU_AVX2
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = widen<float>(src[i]);
}

// dst[i] = src[i] rounded to float16, i < n.
MK_F16C_TARGET inline void narrow_block(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#ifdef MK_CPU_AVX2
  __m256 nan = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(src + i);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  // F16C keeps a NaN's upper payload bits; narrow (and c10) store the plain quiet NaN.
  if (!_mm256_testz_ps(nan, nan)) {
    for (int64_t k = 0; k < i; ++k) {
      if (src[k] != src[k]) dst[k] = narrow<c10::Half>(src[k]);
    }
  }
#endif
  for (; i < n; ++i) dst[i] = narrow<c10::Half>(src[i]);
}

// Whether a loop over scalar_t stages its blocks: float16 where F16C may be used.
template <typename scalar_t, bool kF16C>
inline constexpr bool f16c_staged = kF16C && std::is_same_v<scalar_t, c10::Half>;

// n <= kN values of scalar_t at src, as (*this)[i] in opmath.
template <typename scalar_t, int64_t kN, bool kF16C>
class BlockIn {
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr bool kStaged = f16c_staged<scalar_t, kF16C>;

 public:
  BlockIn(const scalar_t* src, int64_t n) : src_(src) {
    if constexpr (kStaged) widen_block(src, buf_, n);
  }
  opmath_t operator[](int64_t i) const {
    if constexpr (kStaged) {
      return buf_[i];
    } else {
      return widen<opmath_t>(src_[i]);
    }
  }

 private:
  const scalar_t* src_;
  alignas(32) float buf_[kStaged ? kN : 1];
};

// n <= kN values of scalar_t for dst: set(i, v) for each, then store(n).
template <typename scalar_t, int64_t kN, bool kF16C>
class BlockOut {
  using opmath_t = at::opmath_type<scalar_t>;
  static constexpr bool kStaged = f16c_staged<scalar_t, kF16C>;

 public:
  explicit BlockOut(scalar_t* dst) : dst_(dst) {}
  void set(int64_t i, opmath_t v) {
    if constexpr (kStaged) {
      buf_[i] = v;
    } else {
      dst_[i] = narrow<scalar_t>(v);
    }
  }
  // The staged values to memory (unstaged ones are there already).
  void store(int64_t n) {
    if constexpr (kStaged) narrow_block(buf_, dst_, n);
  }

 private:
  scalar_t* dst_;
  alignas(32) float buf_[kStaged ? kN : 1];
};

}  // namespace modekernels

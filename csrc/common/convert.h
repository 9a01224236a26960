// Conversions between a storage type and its opmath type (batch_norm and dropout kernels).
//
// widen<T>(v): v in T, exact. narrow<scalar_t>(v): v rounded to scalar_t, to nearest even, as
// c10's conversions round (NaN stays NaN: 0x7E00 with v's sign in float16, 0x7FC0 in bfloat16;
// too large for float16 becomes infinity). On CUDA both are plain casts. On the CPU, whose build
// targets the baseline ISA (no F16C), c10's float16 conversions run element by element and do not
// vectorize: a float16 BatchNorm measured 10x slower than torch's. Here they are branch-free
// integer and float operations on the bits, which the compiler vectorizes in the loops that call
// them (one shift for bfloat16's widening). The AVX2 and AVX-512 builds of the CPU kernels convert
// spans of float16 with F16C and of bfloat16 with AVX2 or AVX512-BF16 instead, to the same bits
// (common/staged.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "common/macros.h"

#ifndef __CUDA_ARCH__
#include <bit>
#endif

namespace modekernels {

#ifndef __CUDA_ARCH__
namespace detail {

// The float of float16 bits (in the low 16 bits of I). F and I: float and int32_t, or GCC vectors
// of them of one width (the CPU reductions widen four lanes at once).
template <typename F, typename I>
inline F half_bits_to_float(I bits) {
  const I em = bits & 0x7fff;  // exponent and mantissa
  const I sign = (bits & 0x8000) << 16;
  // Normal numbers: the exponent rebiased from 15 to 127 (112 << 23 added); infinity and NaN
  // (exponent 31) go to exponent 255, 112 << 23 further.
  I f = (em << 13) + (112 << 23);
  f = em >= 0x7c00 ? f + (112 << 23) : f;
  // Zero and subnormals: em units of 2^-24, exact in float: 0.5 + em 2^-24 (em as the mantissa
  // of 0.5) less 0.5.
  const F sub = std::bit_cast<F>(em + 0x3f000000) - 0.5f;
  f = em < 0x400 ? std::bit_cast<I>(sub) : f;
  return std::bit_cast<F>(f | sign);
}

// The float of bfloat16 bits (in the low 16 bits of I): their upper half. F and I as above.
template <typename F, typename I>
inline F bfloat16_bits_to_float(I bits) {
  return std::bit_cast<F>(bits << 16);
}

inline uint16_t float_to_half(float v) {
  const uint32_t x = std::bit_cast<uint32_t>(v);
  const uint32_t sign = (x >> 16) & 0x8000;
  const int32_t a = static_cast<int32_t>(x & 0x7fffffff);  // |v|'s bits
  // Normal halves (|v| >= 2^-14): the exponent rebiased from 127 to 15, the mantissa rounded to
  // 10 bits, to nearest even; a carry moves into the exponent (up to infinity).
  const int32_t normal = ((a - (112 << 23)) + 0xfff + ((a >> 13) & 1)) >> 13;
  // Subnormal halves: |v| rounded to a multiple of 2^-24 by adding 0.5 (whose ulp is 2^-24) in
  // float, to nearest even; the multiple is the half's bits (1024 being the smallest normal).
  const int32_t sub = std::bit_cast<int32_t>(std::bit_cast<float>(a) + 0.5f) - std::bit_cast<int32_t>(0.5f);
  int32_t h = a < 0x38800000 ? sub : normal;
  h = a >= 0x477ff000 ? 0x7c00 : h;  // rounds to infinity (65520 and up), or is infinity
  h = a > 0x7f800000 ? 0x7e00 : h;   // NaN
  return static_cast<uint16_t>(static_cast<uint32_t>(h) | sign);
}

inline uint16_t float_to_bfloat16(float v) {
  const uint32_t x = std::bit_cast<uint32_t>(v);
  const uint32_t rounded = (x + 0x7fff + ((x >> 16) & 1)) >> 16;
  return static_cast<int32_t>(x & 0x7fffffff) > 0x7f800000 ? 0x7fc0 : rounded;
}

}  // namespace detail
#endif

template <typename T, typename scalar_t>
MK_HOST_DEVICE T widen(scalar_t v) {
#ifndef __CUDA_ARCH__
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return static_cast<T>(detail::half_bits_to_float<float>(static_cast<int32_t>(v.x)));
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return static_cast<T>(detail::bfloat16_bits_to_float<float>(static_cast<uint32_t>(v.x)));
  }
#endif
  return static_cast<T>(v);
}

template <typename scalar_t, typename T>
MK_HOST_DEVICE scalar_t narrow(T v) {
#ifndef __CUDA_ARCH__
  if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<T, float>) {
    return scalar_t(detail::float_to_half(v), scalar_t::from_bits());
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<T, float>) {
    return scalar_t(detail::float_to_bfloat16(v), scalar_t::from_bits());
  }
#endif
  return static_cast<scalar_t>(v);
}

}  // namespace modekernels

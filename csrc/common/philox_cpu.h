// Philox4x32-10 for runs of consecutive counters on the CPU: the words of `count` groups whose
// counters are (c0, c1, first_group + j), written in group-major order (group j's four words at
// out[4j .. 4j+3]), which is element order for the streams of this project.
//
// With AVX2 (cpu_capability.h) eight counters advance together in 256-bit
// registers: the 32x32->64 multiplies of even and odd lanes are split with _mm256_mul_epu32 and
// blended back, and the 4x8 result is transposed into element order. Elsewhere, the portable
// philox4x32_10 of philox.h runs per group. Both give the same words.
#pragma once

#include <cstdint>

#include "common/cpu_capability.h"
#include "common/philox.h"

#ifdef MK_CPU_AVX2
#include <immintrin.h>
#endif

namespace modekernels {

inline void philox_groups_portable(uint32_t c0, uint32_t c1, uint64_t first_group, int64_t count,
                                   uint32_t k0, uint32_t k1, uint32_t* out) {
  for (int64_t j = 0; j < count; ++j) {
    const uint64_t g = first_group + static_cast<uint64_t>(j);
    const Philox4x32 r = philox4x32_10(c0, c1, static_cast<uint32_t>(g),
                                       static_cast<uint32_t>(g >> 32), k0, k1);
    for (int lane = 0; lane < 4; ++lane) out[4 * j + lane] = r.w[lane];
  }
}

#ifdef MK_CPU_AVX2
__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i m, __m256i& hi,
                                                     __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx2"))) inline void philox_groups_avx2(uint32_t c0, uint32_t c1,
                                                               uint64_t first_group,
                                                               int64_t count, uint32_t k0,
                                                               uint32_t k1, uint32_t* out) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    const uint64_t g = first_group + static_cast<uint64_t>(j);
    if (static_cast<uint32_t>(g) > 0xFFFFFFFFu - 7u) {  // the low word would carry: rare, portable
      philox_groups_portable(c0, c1, g, 8, k0, k1, out + 4 * j);
      continue;
    }
    __m256i x0 = _mm256_set1_epi32(static_cast<int>(c0));
    __m256i x1 = _mm256_set1_epi32(static_cast<int>(c1));
    __m256i x2 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g))), lanes);
    __m256i x3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32)));
    uint32_t key0 = k0;
    uint32_t key1 = k1;
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(x0, m0, hi0, lo0);
      mulhilo8(x2, m1, hi1, lo1);
      x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), _mm256_set1_epi32(static_cast<int>(key0)));
      x1 = lo1;
      x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), _mm256_set1_epi32(static_cast<int>(key1)));
      x3 = lo0;
      key0 += kPhiloxW0;
      key1 += kPhiloxW1;
    }
    // Transpose words-by-group (x0..x3, 8 groups each) into group-major order.
    const __m256i t0 = _mm256_unpacklo_epi32(x0, x1);
    const __m256i t1 = _mm256_unpackhi_epi32(x0, x1);
    const __m256i t2 = _mm256_unpacklo_epi32(x2, x3);
    const __m256i t3 = _mm256_unpackhi_epi32(x2, x3);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2);  // groups 0 and 4
    const __m256i u1 = _mm256_unpackhi_epi64(t0, t2);  // groups 1 and 5
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3);  // groups 2 and 6
    const __m256i u3 = _mm256_unpackhi_epi64(t1, t3);  // groups 3 and 7
    auto* o = reinterpret_cast<__m256i*>(out + 4 * j);
    _mm256_storeu_si256(o + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
    _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
    _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
    _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
  }
  philox_groups_portable(c0, c1, first_group + static_cast<uint64_t>(j), count - j, k0, k1,
                         out + 4 * j);
}
#endif

inline void philox_groups(uint32_t c0, uint32_t c1, uint64_t first_group, int64_t count,
                          uint32_t k0, uint32_t k1, uint32_t* out) {
#ifdef MK_CPU_AVX2
  if (cpu_avx2()) {
    philox_groups_avx2(c0, c1, first_group, count, k0, k1, out);
    return;
  }
#endif
  philox_groups_portable(c0, c1, first_group, count, k0, k1, out);
}

}  // namespace modekernels

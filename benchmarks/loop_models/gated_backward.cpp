// A model of BatchNormAddReLU's backward passes over memory, to see what a loop that stores two
// streams costs: the elementwise pass that read dy, x and the saved output y and wrote both dx and
// the gated dy (the residual's gradient) against the split kept since 2026-12-06, in which the
// gradient-sums pass writes the gated dy and the elementwise pass reads it in dy's place. It is not
// the kernel (csrc/batch_norm/batch_norm_cpu.cpp): plain float32 loops with one channel's
// coefficients, compiled as the AVX-512 build is, split between two threads.
//
//   g++ -O3 -std=c++20 -fopenmp -mavx2 -mfma -mavx512f -mavx512bw -mavx512vl -mavx512dq
//       -mprefer-vector-width=512 -ffp-contract=off gated_backward.cpp -o gated_backward
//   ./gated_backward [elements]        (default 8*256*56*56)
//
// Variants, each timed 60 times in turns with the others (min and median, ms; timing.h):
//   copy              memcpy of dy into dx (the roofline)
//   sums              the old sums pass: read dy, x, y
//   two_stores        the old elementwise pass: read dy, x, y, write dx and the gated dy
//   two_stores_nt     the same with non-temporal stores (no write-allocate reads)
//   sums_gated        the new sums pass: read dy, x, y, write the gated dy
//   from_gated        the new elementwise pass: read the gated dy and x, write dx
// On the Intel Xeon VM (2026-12-06, medians of two runs) two_stores took 4.2-4.3 ms, two_stores_nt
// 2.9-3.0 ms, from_gated 2.6 ms, copy 1.6 ms: the old passes (sums + two_stores) 8.3 ms against the
// new (sums_gated + from_gated) 6.4 ms.
#include <immintrin.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "timing.h"

namespace {

constexpr float kA = 1.1f, kB = 0.3f, kM = 0.1f, kD = 0.2f;  // one channel's coefficients

// The partial sums of each thread's half, kept so that the compiler cannot drop them.
float partial[2][2];

// Sums in 16 lanes (independent accumulators, as the kernel's), i0 and i1 multiples of 16; with
// kGatedOut, the gated dy stored too.
template <bool kGatedOut>
void sums(const float* dy, const float* x, const float* y, int64_t i0, int64_t i1, float* gated) {
  float s[16] = {}, t[16] = {};
  for (int64_t i = i0; i < i1; i += 16) {
    for (int64_t k = 0; k < 16; ++k) {
      const float d = dy[i + k];
      const float g = y[i + k] <= 0.f ? 0.f : d;
      if constexpr (kGatedOut) gated[i + k] = g;
      s[k] += g;
      t[k] += g * (x[i + k] - kM);
    }
  }
  for (int64_t k = 1; k < 16; ++k) {
    s[0] += s[k];
    t[0] += t[k];
  }
  partial[i0 == 0 ? 0 : 1][0] = s[0];
  partial[i0 == 0 ? 0 : 1][1] = t[0];
}

void two_stores(const float* dy, const float* x, const float* y, float* dx, float* gated, int64_t i0,
                int64_t i1) {
#pragma GCC ivdep
  for (int64_t i = i0; i < i1; ++i) {
    const float d = dy[i];
    const float g = y[i] <= 0.f ? 0.f : d;
    gated[i] = g;
    dx[i] = kD + g * kA + (x[i] - kM) * kB;
  }
}

void two_stores_nt(const float* dy, const float* x, const float* y, float* dx, float* gated, int64_t i0,
                   int64_t i1) {
  const __m512 a = _mm512_set1_ps(kA), b = _mm512_set1_ps(kB), m = _mm512_set1_ps(kM), d = _mm512_set1_ps(kD);
  for (int64_t i = i0; i < i1; i += 16) {  // i0 and i1 are multiples of 16, the arrays 64-byte aligned
    const __mmask16 open = _mm512_cmp_ps_mask(_mm512_load_ps(y + i), _mm512_setzero_ps(), _CMP_NLE_UQ);
    const __m512 g = _mm512_maskz_mov_ps(open, _mm512_load_ps(dy + i));
    _mm512_stream_ps(gated + i, g);
    const __m512 centered = _mm512_mul_ps(_mm512_sub_ps(_mm512_load_ps(x + i), m), b);
    _mm512_stream_ps(dx + i, _mm512_add_ps(_mm512_add_ps(d, _mm512_mul_ps(g, a)), centered));
  }
}

void from_gated(const float* gated, const float* x, float* dx, int64_t i0, int64_t i1) {
#pragma GCC ivdep
  for (int64_t i = i0; i < i1; ++i) dx[i] = kD + gated[i] * kA + (x[i] - kM) * kB;
}

float* aligned_floats(int64_t n) {
  auto* p = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(n) * sizeof(float)));
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(i % 7) - 3.f;
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t n = (argc > 1 ? std::atoll(argv[1]) : int64_t{8} * 256 * 56 * 56) / 32 * 32;
  float *dy = aligned_floats(n), *x = aligned_floats(n), *y = aligned_floats(n);
  float *dx = aligned_floats(n), *gated = aligned_floats(n);
  const std::vector<std::pair<const char*, loop_models::Pass>> variants = {
      {"copy", [&](int64_t i0, int64_t i1) { std::memcpy(dx + i0, dy + i0, (i1 - i0) * sizeof(float)); }},
      {"sums", [&](int64_t i0, int64_t i1) { sums<false>(dy, x, y, i0, i1, gated); }},
      {"two_stores", [&](int64_t i0, int64_t i1) { two_stores(dy, x, y, dx, gated, i0, i1); }},
      {"two_stores_nt", [&](int64_t i0, int64_t i1) { two_stores_nt(dy, x, y, dx, gated, i0, i1); }},
      {"sums_gated", [&](int64_t i0, int64_t i1) { sums<true>(dy, x, y, i0, i1, gated); }},
      {"from_gated", [&](int64_t i0, int64_t i1) { from_gated(gated, x, dx, i0, i1); }},
  };
  std::printf("%lld elements, 2 threads\n", static_cast<long long>(n));
  // Units of 16 elements, so that each thread's half is whole vectors for two_stores_nt.
  std::vector<std::pair<const char*, loop_models::Pass>> timed;
  for (const auto& [name, pass] : variants) {
    timed.emplace_back(name, [pass](int64_t u0, int64_t u1) { pass(u0 * 16, u1 * 16); });
  }
  loop_models::time_in_turns(timed, n / 16);
  std::printf("(sums %g)\n", static_cast<double>(partial[0][0] + partial[1][0]));
  for (float* p : {dy, x, y, dx, gated}) std::free(p);
}

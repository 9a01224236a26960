// A model of what ordinary and non-temporal (streaming) stores cost a pass over tensors larger
// than the caches: BatchNormAddReLU's gradient-sums pass over channels-last memory (256
// channels), which reads dy, x and the saved output y, sums per channel, and writes the gated dy,
// then the elementwise pass that reads the gated dy and x and writes dx. It is not the kernel
// (csrc/batch_norm/batch_norm_cpu.cpp, csrc/common/stream.h): float32 loops written with AVX-512
// intrinsics, split between two threads.
//
//   g++ -O3 -std=c++20 -fopenmp -mavx512f -mavx512dq -mprefer-vector-width=512 -ffp-contract=off
//       streaming_stores.cpp -o streaming_stores
//   ./streaming_stores [rows]        (default 8*56*56 rows of 256 channels: 25.7 MB a tensor)
//
// Variants, each timed 60 times in turns with the others (min and median, ms; timing.h):
//   copy               memcpy of dy into dx
//   sums               the sums alone: read dy, x, y
//   sums_stored        the sums, and the gated dy written with ordinary stores
//   sums_streamed      the same with non-temporal stores
//   then_dx_stored     sums_stored, then the dx pass (reads the gated dy and x, writes dx)
//   then_dx_streamed   sums_streamed, then the same dx pass
// On the Intel Xeon VM (2026-12-06, two runs): copy 1.2-1.5 ms, sums 1.5-1.7, sums_stored
// 3.1-3.9, sums_streamed 1.85-2.0, then_dx_stored 5.3-6.0, then_dx_streamed 4.05-4.3. An ordinary
// store reads its line first (a read for ownership), and the line goes back to memory later; a
// non-temporal one writes the line to memory once.
#include <immintrin.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "timing.h"

namespace {

constexpr int64_t kC = 256;  // channels

// Per-thread sums, kept so that the compiler cannot drop them.
float partial[2];

enum class Gated { kNone, kStored, kStreamed };

// The sums of rows r0 <= r < r1 (per channel, in arrays that stay in L1), as the kernel's
// channels-last sweep over rows of fewer than 1024 channels.
template <Gated kGated>
void sums(const float* dy, const float* x, const float* y, float* gated, int64_t r0, int64_t r1) {
  alignas(64) float a[kC] = {}, b[kC] = {}, mean[kC];
  for (int64_t c = 0; c < kC; ++c) mean[c] = 0.1f;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t c = 0; c < kC; c += 16) {
      const int64_t i = r * kC + c;
      const __mmask16 open = _mm512_cmp_ps_mask(_mm512_load_ps(y + i), _mm512_setzero_ps(), _CMP_NLE_UQ);
      const __m512 g = _mm512_maskz_load_ps(open, dy + i);
      _mm512_store_ps(a + c, _mm512_add_ps(_mm512_load_ps(a + c), g));
      const __m512 centered = _mm512_sub_ps(_mm512_load_ps(x + i), _mm512_load_ps(mean + c));
      _mm512_store_ps(b + c, _mm512_add_ps(_mm512_load_ps(b + c), _mm512_mul_ps(g, centered)));
      if constexpr (kGated == Gated::kStored) _mm512_store_ps(gated + i, g);
      if constexpr (kGated == Gated::kStreamed) _mm512_stream_ps(gated + i, g);
    }
  }
  if constexpr (kGated == Gated::kStreamed) _mm_sfence();
  partial[r0 == 0 ? 0 : 1] = a[3] + b[5];
}

void dx_pass(const float* gated, const float* x, float* dx, int64_t r0, int64_t r1) {
#pragma GCC ivdep
  for (int64_t i = r0 * kC; i < r1 * kC; ++i) dx[i] = 0.2f + gated[i] * 1.1f + (x[i] - 0.1f) * 0.3f;
}

float* aligned_floats(int64_t n) {
  auto* p = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(n) * sizeof(float)));
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(i * 7919 % 13) - 6.f;
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t rows = argc > 1 ? std::atoll(argv[1]) : int64_t{8} * 56 * 56;
  const int64_t n = rows * kC;
  float *dy = aligned_floats(n), *x = aligned_floats(n), *y = aligned_floats(n);
  float *gated = aligned_floats(n), *dx = aligned_floats(n);
  const std::vector<std::pair<const char*, loop_models::Pass>> variants = {
      {"copy", [&](int64_t r0, int64_t r1) { std::memcpy(dx + r0 * kC, dy + r0 * kC, (r1 - r0) * kC * sizeof(float)); }},
      {"sums", [&](int64_t r0, int64_t r1) { sums<Gated::kNone>(dy, x, y, gated, r0, r1); }},
      {"sums_stored", [&](int64_t r0, int64_t r1) { sums<Gated::kStored>(dy, x, y, gated, r0, r1); }},
      {"sums_streamed", [&](int64_t r0, int64_t r1) { sums<Gated::kStreamed>(dy, x, y, gated, r0, r1); }},
      {"then_dx_stored", [&](int64_t r0, int64_t r1) {
         sums<Gated::kStored>(dy, x, y, gated, r0, r1);
         dx_pass(gated, x, dx, r0, r1);
       }},
      {"then_dx_streamed", [&](int64_t r0, int64_t r1) {
         sums<Gated::kStreamed>(dy, x, y, gated, r0, r1);
         dx_pass(gated, x, dx, r0, r1);
       }},
  };
  std::printf("%lld rows of %lld channels, 2 threads\n", static_cast<long long>(rows), static_cast<long long>(kC));
  loop_models::time_in_turns(variants, rows);
  std::printf("(sums %g)\n", static_cast<double>(partial[0] + partial[1]));
  for (float* p : {dy, x, y, gated, dx}) std::free(p);
}

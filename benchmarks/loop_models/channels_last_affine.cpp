// A model of BatchNorm's channels-last elementwise pass (eval: out = d + (x - m) b per element,
// with the channel's m, b, d), timed alone in variants of its loop, to see what its per-channel
// coefficient loads cost. It is not the kernel (csrc/batch_norm/batch_norm_cpu.cpp): plain float32
// loops, compiled as the AVX-512 build is, over rows of C channels split between two threads.
//
//   g++ -O3 -std=c++20 -fopenmp -mavx2 -mfma -mavx512f -mavx512bw -mavx512vl -mavx512dq
//       -mprefer-vector-width=512 -ffp-contract=off channels_last_affine.cpp -o channels_last_affine
//   ./channels_last_affine [C] [elements]        (default 256 and 8*256*56*56)
//
// Variants, each timed 60 times in turns with the others (min and median, ms; timing.h):
//   copy          memcpy of the same bytes (the roofline)
//   registers     coefficients in registers: the channels-first pass's loop (one channel per row)
//   three_arrays  row by row, m, b, d read per element: the kernel's loop for most C
//   registered    the same with C known at compile time (32, 64 or 128): the coefficients, copied
//                 into local arrays, stay in registers; the kernel's loop for those C
//   two_arrays    row by row, out = x a + c: torch's loop (two coefficients)
//   tile          runs of >= 512 elements over coefficients repeated to the run's length
//   four_rows     each coefficient read once for four rows
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#include "timing.h"

namespace {

int64_t C = 256;

void registers(const float* x, float* o, int64_t n, float m, float b, float d) {
  for (int64_t i = 0; i < n; ++i) o[i] = d + (x[i] - m) * b;
}

void three_arrays(const float* x, float* o, int64_t n, const float* m, const float* b, const float* d) {
  for (int64_t r = 0; r < n; r += C) {
#pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) o[r + c] = d[c] + (x[r + c] - m[c]) * b[c];
  }
}

template <int64_t kC>
void registered(const float* x, float* o, int64_t n, const float* m, const float* b, const float* d) {
  float lm[kC], lb[kC], ld[kC];
  for (int64_t c = 0; c < kC; ++c) lm[c] = m[c], lb[c] = b[c], ld[c] = d[c];
  for (int64_t r = 0; r < n; r += kC) {
#pragma GCC ivdep
    for (int64_t c = 0; c < kC; ++c) o[r + c] = ld[c] + (x[r + c] - lm[c]) * lb[c];
  }
}

void two_arrays(const float* x, float* o, int64_t n, const float* a, const float* c0) {
  for (int64_t r = 0; r < n; r += C) {
#pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) o[r + c] = x[r + c] * a[c] + c0[c];
  }
}

void tile(const float* x, float* o, int64_t n, const float* m, const float* b, const float* d, int64_t len) {
  for (int64_t r = 0; r < n; r += len) {
    const int64_t end = std::min(len, n - r);
#pragma GCC ivdep
    for (int64_t t = 0; t < end; ++t) o[r + t] = d[t] + (x[r + t] - m[t]) * b[t];
  }
}

void four_rows(const float* x, float* o, int64_t n, const float* m, const float* b, const float* d) {
  int64_t r = 0;
  for (; r + 4 * C <= n; r += 4 * C) {
#pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) {
      const float mc = m[c], bc = b[c], dc = d[c];
      [&]<int... J>(std::integer_sequence<int, J...>) {
        ((o[r + J * C + c] = dc + (x[r + J * C + c] - mc) * bc), ...);
      }(std::make_integer_sequence<int, 4>{});
    }
  }
  three_arrays(x + r, o + r, n - r, m, b, d);  // the rows left over
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) C = std::atoll(argv[1]);
  const int64_t n = argc > 2 ? std::atoll(argv[2]) : int64_t{8} * 256 * 56 * 56;
  const int64_t rows = n / C;
  std::vector<float> x(n), o(n), coeffs(4 * C, 1.0f);
  for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(i % 7);
  // The kernel's (4, C) coefficient rows: a, b, m, d.
  const float *b = coeffs.data() + C, *m = coeffs.data() + 2 * C, *d = coeffs.data() + 3 * C;
  const int64_t len = (512 + C - 1) / C * C;
  std::vector<float> tiles(3 * len);
  for (int64_t t = 0; t < len; ++t) {
    tiles[t] = m[t % C];
    tiles[len + t] = b[t % C];
    tiles[2 * len + t] = d[t % C];
  }
  // A variant's pass over k elements (whole rows) from xs to os.
  using Rows = std::function<void(const float*, float*, int64_t)>;
  std::vector<std::pair<const char*, Rows>> variants = {
      {"copy", [&](const float* xs, float* os, int64_t k) { std::memcpy(os, xs, k * sizeof(float)); }},
      {"registers", [&](const float* xs, float* os, int64_t k) { registers(xs, os, k, 1.f, 2.f, 3.f); }},
      {"three_arrays", [&](const float* xs, float* os, int64_t k) { three_arrays(xs, os, k, m, b, d); }},
      {"two_arrays", [&](const float* xs, float* os, int64_t k) { two_arrays(xs, os, k, b, d); }},
      {"tile", [&](const float* xs, float* os, int64_t k) {
         tile(xs, os, k, tiles.data(), tiles.data() + len, tiles.data() + 2 * len, len);
       }},
      {"four_rows", [&](const float* xs, float* os, int64_t k) { four_rows(xs, os, k, m, b, d); }},
  };
  const auto registered_at = [&](auto kC) {
    if (C == decltype(kC)::value) {
      variants.emplace_back("registered", [&](const float* xs, float* os, int64_t k) {
        registered<decltype(kC)::value>(xs, os, k, m, b, d);
      });
    }
  };
  registered_at(std::integral_constant<int64_t, 32>{});
  registered_at(std::integral_constant<int64_t, 64>{});
  registered_at(std::integral_constant<int64_t, 128>{});
  std::vector<std::pair<const char*, loop_models::Pass>> timed;
  for (const auto& [name, pass] : variants) {
    timed.emplace_back(name, [&, pass](int64_t r0, int64_t r1) { pass(&x[r0 * C], &o[r0 * C], (r1 - r0) * C); });
  }
  std::printf("C = %lld, %lld elements, 2 threads\n", static_cast<long long>(C), static_cast<long long>(n));
  loop_models::time_in_turns(timed, rows);
}

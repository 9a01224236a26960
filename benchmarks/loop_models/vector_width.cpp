// A model of the float32 one-pass loops (BatchNorm eval's affine pass, dropout_add's eval add),
// timed with 512-bit and with 256-bit vectors, to see what the vector width costs a loop that is
// bound by memory. It is not the kernel (csrc/batch_norm, csrc/dropout): plain loops, each
// compiled for AVX-512 with GCC's preferred vector width set per function, over a buffer split
// between two threads.
//
//   g++ -O3 -std=c++20 -fopenmp -ffp-contract=off vector_width.cpp -o vector_width
//   ./vector_width [elements]        (default 8*256*56*56: 25.7 MB per float32 tensor)
//
// Variants, each timed 60 times in turns with the others (min and median, ms; timing.h):
//   copy          memcpy of the same bytes (the roofline of the affine pass)
//   affine_512    out = d + (x - m) b, 512-bit vectors (the AVX-512 build's loop)
//   affine_256    the same with 256-bit vectors
//   add_512       out = x + r, 512-bit vectors
//   add_256       the same with 256-bit vectors
// On the development machine (AMD EPYC, Zen 4, 2 threads, 2026-12-05; medians of two runs) the
// 256-bit versions took less time from memory (16 and 25.7 MB per tensor): add 12-15%, affine
// 3-11%; in cache (1 MB) about the same.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "timing.h"

#define MK_WIDTH(bits) __attribute__((target("avx2,avx512f,prefer-vector-width=" #bits), noinline))

namespace {

MK_WIDTH(512)
void affine_512(const float* __restrict x, float* __restrict o, int64_t n, float m, float b, float d) {
  for (int64_t i = 0; i < n; ++i) o[i] = d + (x[i] - m) * b;
}

MK_WIDTH(256)
void affine_256(const float* __restrict x, float* __restrict o, int64_t n, float m, float b, float d) {
  for (int64_t i = 0; i < n; ++i) o[i] = d + (x[i] - m) * b;
}

MK_WIDTH(512)
void add_512(const float* __restrict x, const float* __restrict r, float* __restrict o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = x[i] + r[i];
}

MK_WIDTH(256)
void add_256(const float* __restrict x, const float* __restrict r, float* __restrict o, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = x[i] + r[i];
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : int64_t{8} * 256 * 56 * 56;
  std::vector<float> x(n), r(n), o(n);
  for (int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<float>(i % 7);
    r[i] = static_cast<float>(i % 5);
  }
  const std::vector<std::pair<const char*, loop_models::Pass>> variants = {
      {"copy", [&](int64_t i0, int64_t i1) { std::memcpy(&o[i0], &x[i0], (i1 - i0) * sizeof(float)); }},
      {"affine_512", [&](int64_t i0, int64_t i1) { affine_512(&x[i0], &o[i0], i1 - i0, 1.f, 2.f, 3.f); }},
      {"affine_256", [&](int64_t i0, int64_t i1) { affine_256(&x[i0], &o[i0], i1 - i0, 1.f, 2.f, 3.f); }},
      {"add_512", [&](int64_t i0, int64_t i1) { add_512(&x[i0], &r[i0], &o[i0], i1 - i0); }},
      {"add_256", [&](int64_t i0, int64_t i1) { add_256(&x[i0], &r[i0], &o[i0], i1 - i0); }},
  };
  std::printf("%lld elements, 2 threads\n", static_cast<long long>(n));
  loop_models::time_in_turns(variants, n);
}

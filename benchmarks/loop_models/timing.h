// The loop models' timing: each variant runs on two threads, which split a range of units in
// halves as at::parallel_for splits a kernel's range, 60 times in turns with the other variants;
// printed as the minimum and median milliseconds.
#pragma once

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <utility>
#include <vector>

namespace loop_models {

// A variant's work on units [u0, u1): elements, or rows of a model's own.
using Pass = std::function<void(int64_t u0, int64_t u1)>;

inline void time_in_turns(const std::vector<std::pair<const char*, Pass>>& variants, int64_t units) {
  std::vector<std::vector<double>> ms(variants.size());
  for (int turn = 0; turn < 60; ++turn) {
    for (size_t v = 0; v < variants.size(); ++v) {
      const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(2)
      {
        const int64_t t = omp_get_thread_num();
        variants[v].second(units * t / 2, units * (t + 1) / 2);
      }
      ms[v].push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  for (size_t v = 0; v < variants.size(); ++v) {
    std::sort(ms[v].begin(), ms[v].end());
    std::printf("%-13s min %.3f  median %.3f ms\n", variants[v].first, ms[v].front(), ms[v][ms[v].size() / 2]);
  }
}

}  // namespace loop_models

// The grain the CPU kernels give at::parallel_for.
#pragma once

#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE

#include <algorithm>
#include <cstdint>

namespace modekernels {

// For tasks of `elems_per_task` elements: enough tasks per thread that each thread's share is at
// least at::internal::GRAIN_SIZE elements, so that a small tensor runs inline instead of waking
// the thread pool (an OpenMP region costs microseconds). Tasks are what every reduction's order
// follows, and the grain only deals them out, so it changes no result.
inline int64_t grain_for(int64_t elems_per_task) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, elems_per_task));
}

}  // namespace modekernels

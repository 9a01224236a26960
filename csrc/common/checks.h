// Checks shared by the op families' bodies (csrc/*/*.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace modekernels {

// A required tensor argument: torch's Python binding hands a None through as an undefined tensor,
// which every other check would misreport ("UNKNOWN_SCALAR", "tensor does not have a device").
inline void check_defined(const at::Tensor& t, const char* family, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), "modekernels ", family, ": expected ", name,
                   " to be a Tensor, but got None");
}

}  // namespace modekernels

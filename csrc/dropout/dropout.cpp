// Dropout op bodies shared by the CPU and CUDA backends: input checks (written once, run before
// anything is allocated or written), output allocation, and the dense-buffer contract of Apply.
#include "dropout/dropout.h"

#include <ATen/ATen.h>

namespace modekernels::dropout {
namespace {

void check_p(double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0,
                    "dropout probability has to be between 0 and 1, but got ", p);
}

void check_floating(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   "modekernels dropout: expected ", name,
                   " to be float32, float64, float16 or bfloat16, but got ", dt);
}

void check_state(const at::Tensor& state, const at::Tensor& grad) {
  TORCH_CHECK(state.scalar_type() == at::kLong && state.dim() == 1 && state.numel() == 2,
              "modekernels dropout: expected rng_state to be the int64 tensor of 2 elements that "
              "the forward returned, but got ", state.scalar_type(), " of shape ", state.sizes());
  TORCH_CHECK(state.device() == grad.device(),
              "modekernels dropout: expected rng_state on ", grad.device(), " like grad_output, but got ",
              state.device());
}

// A tensor the kernel can walk as one dense buffer: `t` itself when it is non-overlapping and
// dense (contiguous, channels_last or any permutation), else a dense copy with the same dimension
// order, which is the layout at::empty_like(t) gives the output.
at::Tensor dense(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : at::empty_like(t).copy_(t);
}

at::Tensor new_state(const at::Tensor& like) {
  return at::empty({2}, like.options().dtype(at::kLong));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, double p,
                                           const std::optional<at::Generator>& generator,
                                           Apply apply) {
  check_p(p);
  check_floating(input, "input");
  at::Tensor src = dense(input);
  at::Tensor out = at::empty_like(src);
  at::Tensor state = new_state(input);
  apply(src, out, p, generator, state, /*draw=*/true);
  return {out, state};
}

at::Tensor forward_(at::Tensor& input, double p, const std::optional<at::Generator>& generator,
                    Apply apply) {
  check_p(p);
  check_floating(input, "input");
  at::Tensor state = new_state(input);
  if (input.is_non_overlapping_and_dense()) {
    apply(input, input, p, generator, state, /*draw=*/true);
  } else {
    at::Tensor buf = dense(input);
    apply(buf, buf, p, generator, state, /*draw=*/true);
    input.copy_(buf);
  }
  return state;
}

at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& state, double p, Apply apply) {
  check_p(p);
  check_floating(grad_output, "grad_output");
  check_state(state, grad_output);
  at::Tensor src = dense(grad_output);
  at::Tensor grad_input = at::empty_like(src);
  apply(src, grad_input, p, std::nullopt, state, /*draw=*/false);
  return grad_input;
}

}  // namespace modekernels::dropout

// Dropout op bodies shared by the CPU and CUDA backends: input checks (written once, run before
// anything is allocated or written), output allocation, and the dense-buffer contract of Apply.
#include "dropout/dropout.h"

#include "common/checks.h"

#include <ATen/ATen.h>

namespace modekernels::dropout {
namespace {

void check_p(double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0,
                    "dropout probability has to be between 0 and 1, but got ", p);
}

void check_floating(const at::Tensor& t, const char* name) {
  check_defined(t, "dropout", name);
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   "modekernels dropout: expected ", name,
                   " to be float32, float64, float16 or bfloat16, but got ", dt);
}

// The backward's rng_state, checked, as the dense pair the kernels read.
at::Tensor checked_state(const at::Tensor& state, const at::Tensor& grad) {
  check_defined(state, "dropout", "rng_state");
  TORCH_CHECK(state.scalar_type() == at::kLong && state.dim() == 1 && state.numel() == 2,
              "modekernels dropout: expected rng_state to be the int64 tensor of 2 elements that "
              "the forward returned, but got ", state.scalar_type(), " of shape ", state.sizes());
  TORCH_CHECK(state.device() == grad.device(),
              "modekernels dropout: expected rng_state on ", grad.device(), " like grad_output, but got ",
              state.device());
  return state.contiguous();
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

// A tensor with the strides of torch's residual + dropout(x) for `input` x: the residual itself
// when it is dense, else an empty tensor with the strides that the sum's TensorIterator gives (it
// follows the residual, and dropout(x), which has x's dense layout, where the residual's strides
// tie, as an expanded one's do), worked out on meta tensors.
at::Tensor sum_layout(const at::Tensor& residual, const at::Tensor& input) {
  if (residual.is_non_overlapping_and_dense()) return residual;
  const auto meta = [](const at::Tensor& t) {
    return at::empty_strided(t.sizes(), t.strides(), t.options().device(at::kMeta));
  };
  const at::Tensor x = meta(input);
  const at::Tensor dropped = x.is_non_overlapping_and_dense() ? x : at::empty_like(x);
  const at::Tensor sum = at::add(meta(residual), dropped);
  return at::empty_strided(sum.sizes(), sum.strides(), residual.options());
}

// `t` in exactly the strides of `like` (copied only if it has others).
at::Tensor match(const at::Tensor& t, const at::Tensor& like) {
  return t.strides() == like.strides() ? t : at::empty_like(like).copy_(t);
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& input) {
  check_defined(t, "dropout", name);
  TORCH_CHECK(t.sizes() == input.sizes() && t.scalar_type() == input.scalar_type() &&
                  t.device() == input.device(),
              "modekernels dropout: expected ", name, " like input (", input.sizes(), ", ",
              input.scalar_type(), ", ", input.device(), "), but got ", t.sizes(), ", ",
              t.scalar_type(), ", ", t.device());
}

// Channel-wise dropout walks (N, C, S) or channels-last (N, S, C) memory; other layouts are
// copied into the first (and the result back into the input's layout, as torch's elementwise
// output has it: feature(), feature_backward()). Fills the Fusion's unit description for `t` as
// laid out.
at::Tensor feature_layout(const at::Tensor& t, Fusion& fusion) {
  TORCH_CHECK(t.dim() >= 2, "Feature dropout requires at least 2 dimensions in the input");  // torch's
  const int64_t N = t.size(0);
  const int64_t C = t.size(1);
  const auto fmt = t.suggest_memory_format();
  const bool cl = fmt != at::MemoryFormat::Contiguous && t.is_contiguous(fmt);
  at::Tensor dense_t = cl ? t : t.contiguous();
  fusion.channel_S = N * C == 0 ? 1 : std::max<int64_t>(1, t.numel() / (N * C));
  fusion.channels_last_C = cl ? C : 0;
  return dense_t;
}

std::tuple<at::Tensor, at::Tensor> run(const at::Tensor& src, double p, const OptGenerator& generator,
                                       Apply apply, const Fusion& fusion) {
  at::Tensor out = at::empty_like(src);
  at::Tensor state = new_state(src);
  apply(src, out, p, generator, state, /*draw=*/true, fusion);
  return {out, state};
}

at::Tensor run_(at::Tensor& input, const at::Tensor& buf, double p, const OptGenerator& generator,
                Apply apply, const Fusion& fusion) {
  at::Tensor state = new_state(input);
  apply(buf, buf, p, generator, state, /*draw=*/true, fusion);
  if (!buf.is_same(input)) input.copy_(buf);
  return state;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& input, double p,
                                           const OptGenerator& generator, Apply apply) {
  check_p(p);
  check_floating(input, "input");
  return run(dense(input), p, generator, apply, {});
}

at::Tensor forward_(at::Tensor& input, double p, const OptGenerator& generator, Apply apply) {
  check_p(p);
  check_floating(input, "input");
  return run_(input, dense(input), p, generator, apply, {});
}

at::Tensor backward(const at::Tensor& grad_output, const at::Tensor& state, double p, Apply apply) {
  check_p(p);
  check_floating(grad_output, "grad_output");
  const at::Tensor st = checked_state(state, grad_output);
  at::Tensor src = dense(grad_output);
  at::Tensor grad_input = at::empty_like(src);
  apply(src, grad_input, p, std::nullopt, st, /*draw=*/false, {});
  return grad_input;
}

std::tuple<at::Tensor, at::Tensor> add(const at::Tensor& input, const at::Tensor& residual,
                                       double p, const OptGenerator& generator, Apply apply) {
  check_p(p);
  check_floating(input, "input");
  check_like(residual, "residual", input);
  const at::Tensor src = dense(input);
  Fusion fusion;
  fusion.residual = match(residual, src);
  auto [out, state] = run(src, p, generator, apply, fusion);
  return {match(out, sum_layout(residual, input)), state};
}

std::tuple<at::Tensor, at::Tensor> bias_add(const at::Tensor& input, const at::Tensor& bias,
                                            const at::Tensor& residual, double p,
                                            const OptGenerator& generator, Apply apply) {
  check_p(p);
  check_floating(input, "input");
  check_like(residual, "residual", input);
  check_defined(bias, "bias_dropout_add", "bias");
  TORCH_CHECK(input.dim() >= 1 && bias.dim() == 1 && bias.numel() == input.size(-1) &&
                  bias.scalar_type() == input.scalar_type() && bias.device() == input.device(),
              "modekernels bias_dropout_add: expected bias of shape (", input.dim() ? input.size(-1) : 0,
              ",) like input's last dimension, dtype and device, but got ", bias.sizes(), ", ",
              bias.scalar_type(), ", ", bias.device());
  const at::Tensor src = input.contiguous();  // the bias runs along the innermost dimension
  Fusion fusion;
  fusion.residual = match(residual, src);
  fusion.bias = bias.contiguous();
  auto [out, state] = run(src, p, generator, apply, fusion);
  return {match(out, sum_layout(residual, input)), state};
}

std::tuple<at::Tensor, at::Tensor> feature(const at::Tensor& input, double p,
                                           const OptGenerator& generator, Apply apply) {
  check_p(p);
  check_floating(input, "input");
  Fusion fusion;
  const at::Tensor like = dense(input);
  auto [out, state] = run(feature_layout(like, fusion), p, generator, apply, fusion);
  return {match(out, like), state};
}

at::Tensor feature_(at::Tensor& input, double p, const OptGenerator& generator, Apply apply) {
  check_p(p);
  check_floating(input, "input");
  Fusion fusion;
  const at::Tensor buf = feature_layout(input, fusion);
  return run_(input, buf, p, generator, apply, fusion);
}

at::Tensor feature_backward(const at::Tensor& grad_output, const at::Tensor& state, double p,
                            Apply apply) {
  check_p(p);
  check_floating(grad_output, "grad_output");
  const at::Tensor st = checked_state(state, grad_output);
  Fusion fusion;
  const at::Tensor like = dense(grad_output);
  const at::Tensor src = feature_layout(like, fusion);
  at::Tensor grad_input = at::empty_like(src);
  apply(src, grad_input, p, std::nullopt, st, /*draw=*/false, fusion);
  return match(grad_input, like);
}

}  // namespace modekernels::dropout

// Autograd for the dropout ops (common/autograd.h says why in C++). Every gradient is the incoming
// one through the mask that the saved 16-byte rng_state regenerates: one dropout_backward call,
// one read and one write, plus a sum over rows for bias_dropout_add's bias and the incoming
// gradient itself for a residual. The backward ops are linear, so their own gradient is the same
// mask again (double backward). The in-place ops are differentiated in Python (_DropoutInplace).
#include "common/autograd.h"

#include <ATen/OpMathType.h>
#include <torch/library.h>

namespace modekernels::dropout {
namespace {

using namespace modekernels::autograd;
using at::Tensor;
using OptGenerator = std::optional<at::Generator>;
using Pair = std::tuple<Tensor, Tensor>;

// The forward op that the given operands call for, below autograd.
Pair call_forward(const Tensor& input, const OptTensor& bias, const OptTensor& residual, double p,
                  const OptGenerator& generator, bool feature) {
  static const auto dropout = op<Pair(const Tensor&, double, const OptGenerator&)>("modekernels::dropout");
  static const auto feature_dropout =
      op<Pair(const Tensor&, double, const OptGenerator&)>("modekernels::feature_dropout");
  static const auto dropout_add =
      op<Pair(const Tensor&, const Tensor&, double, const OptGenerator&)>("modekernels::dropout_add");
  static const auto bias_dropout_add =
      op<Pair(const Tensor&, const Tensor&, const Tensor&, double, const OptGenerator&)>(
          "modekernels::bias_dropout_add");
  at::AutoDispatchBelowADInplaceOrView below;
  if (bias) return bias_dropout_add.call(input, *bias, *residual, p, generator);
  if (residual) return dropout_add.call(input, *residual, p, generator);
  return (feature ? feature_dropout : dropout).call(input, p, generator);
}

Tensor call_backward(const Tensor& grad, const Tensor& state, double p, bool feature) {
  using Sig = Tensor(const Tensor&, const Tensor&, double);
  static const auto dropout_backward = op<Sig>("modekernels::dropout_backward");
  static const auto feature_backward = op<Sig>("modekernels::feature_dropout_backward");
  return (feature ? feature_backward : dropout_backward).call(grad, state, p);
}

// What a mask's backward needs: the rng_state, p, and the strides of the tensor the mask was laid
// over (an elementwise mask follows the memory order of its input's dense layout, or contiguous
// order for bias_dropout_add, whose kernel reads its input so; a channel-wise one belongs to the
// (n, c) indices). Sizes and strides are read as SymInts here and below, so that torch.compile
// with dynamic shapes keeps them symbolic instead of specializing the graph to the first input's.
void save_mask(AutogradContext* ctx, const Tensor& state, double p, c10::SymIntArrayRef stride,
               bool feature, bool contiguous = false) {
  ctx->set_materialize_grads(false);
  ctx->save_for_backward({state});
  ctx->saved_data["p"] = p;
  ctx->saved_data["feature"] = feature;
  ctx->saved_data["contiguous"] = contiguous;
  ctx->saved_data["stride"] = stride;
}

// The strides of the dense tensor an elementwise kernel walks for `t` (dropout.cpp's dense(),
// here laid out on the meta device, which allocates nothing).
std::vector<c10::SymInt> dense_strides(const Tensor& t) {
  if (t.is_non_overlapping_and_dense()) return t.sym_strides().vec();
  return at::empty_like(t, t.options().device(at::kMeta)).sym_strides().vec();
}

// grad through the saved mask, in grad's layout. p == 0 kept every element with factor 1 (the
// fused ops' eval sums). The call goes through the dispatcher: its autograd kernel records a
// double backward and carries a forward-mode tangent on grad.
Tensor apply_saved_mask(AutogradContext* ctx, const Tensor& grad) {
  const double p = ctx->saved_data["p"].toDouble();
  if (p == 0) return grad;
  const bool feature = ctx->saved_data["feature"].toBool();
  const Tensor state = ctx->get_saved_variables()[0];
  if (ctx->saved_data["contiguous"].toBool()) {
    if (grad.is_contiguous()) return call_backward(grad, state, p, feature);
    return at::empty_like(grad).copy_(call_backward(grad.contiguous(), state, p, feature));
  }
  const std::vector<c10::SymInt> stride = ctx->saved_data["stride"].toSymIntVector();
  if (feature || grad.sym_strides().equals(stride)) return call_backward(grad, state, p, feature);
  return call_backward(at::empty_strided_symint(grad.sym_sizes(), stride, grad.options()).copy_(grad),
                       state, p, feature);
}

// On the Compose path (autograd.h) the mask is applied by torch operations, in the opmath
// dtype: it is the op's output for ones of t's layout (elementwise; contiguous for
// bias_dropout_add, which reads its input so), or of shape (N, C, 1, ...) (feature). The ones are
// made like (a slice of) t, so that under vmap they are batched as t is and each sample draws its
// own mask when vmap's randomness says so.
Tensor ones_for(const Tensor& t, bool feature, bool contiguous = false) {
  Tensor like = t;
  for (int64_t d = 2; feature && d < t.dim(); ++d) {
    like = like.narrow_symint(d, 0, t.sym_size(d).min(1));
  }
  const auto format = contiguous ? at::MemoryFormat::Contiguous : at::MemoryFormat::Preserve;
  return at::ones_like(like, t.options().dtype(at::toOpMathType(t.scalar_type())), format);
}

Pair composed(const Tensor& input, const OptTensor& bias, const OptTensor& residual, double p,
              const OptGenerator& generator, bool feature) {
  const auto dtype = at::toOpMathType(input.scalar_type());
  auto [multiplier, state] =
      call_forward(ones_for(input, feature, /*contiguous=*/bias.has_value()), std::nullopt,
                   std::nullopt, p, generator, feature);
  Tensor out = input.to(dtype);
  if (bias) out = out + bias->to(dtype);
  out = out * multiplier;
  if (residual) out = residual->to(dtype) + out;  // its layout, as the ops give it
  return {out.to(input.scalar_type()), state};
}

}  // namespace

// The Functions, named (not anonymous) for their nodes' names in the autograd graph.

// residual? + dropout(input + bias?) for every forward op: (input, bias, residual, p, generator,
// feature) -> (output, rng_state).
struct Masked : torch::autograd::Function<Masked> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& bias,
                               const OptTensor& residual, double p, const OptGenerator& generator,
                               bool feature) {
    // rng_state, an integer tensor, is not differentiable (nor marked so: compiled autograd
    // refuses a Function that marks outputs).
    auto [out, state] = call_forward(input, bias, residual, p, generator, feature);
    save_mask(ctx, state, p, dense_strides(input), feature, /*contiguous=*/bias.has_value());
    ctx->saved_data["bias_edge"] = edges(input, bias)[1];
    ctx->saved_data["residual"] = residual.has_value();
    return {out, state};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(6);
    const Tensor& grad = grads[0];
    if (!grad.defined()) return result;
    result[0] = apply_saved_mask(ctx, grad);
    if (needs_grad(ctx, ctx->saved_data["bias_edge"].toInt())) {
      result[1] = result[0].sum_to_size_symint({result[0].sym_size(-1)});  // an empty last dim too
    }
    if (ctx->saved_data["residual"].toBool()) result[2] = grad;
    return result;
  }
};

// dropout_backward and feature_dropout_backward: (grad_output, rng_state, p, feature).
struct MaskBackward : torch::autograd::Function<MaskBackward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad, const Tensor& state, double p,
                               bool feature) {
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = call_backward(grad, state, p, feature);
    }
    save_mask(ctx, state, p, out.sym_strides(), feature);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {grads[0].defined() ? apply_saved_mask(ctx, grads[0]) : Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

namespace {

Pair masked(const Tensor& input, const OptTensor& bias, const OptTensor& residual,
            double p, const OptGenerator& generator, bool feature) {
  switch (path(input, bias, residual)) {
    case Path::Direct:
      return call_forward(input, bias, residual, p, generator, feature);
    case Path::Compose:
      return composed(input, bias, residual, p, generator, feature);
    case Path::Record:
      break;
  }
  auto out = Masked::apply(input, bias, residual, p, generator, feature);
  return {out[0], out[1]};
}

// The backward ops are linear in grad, so a tangent on it goes through the same mask.
Tensor mask_backward(const Tensor& grad, const Tensor& state, double p, bool feature) {
  return linear_in_grad(grad, [&](const Tensor& g) -> variable_list {
    switch (path(g, state)) {
      case Path::Direct: {
        at::AutoDispatchBelowADInplaceOrView below;
        return {call_backward(g, state, p, feature)};
      }
      case Path::Compose: {
        const Tensor multiplier = call_backward(ones_for(g, feature), state, p, feature);
        return {(g.to(multiplier.scalar_type()) * multiplier).to(g.scalar_type())};
      }
      case Path::Record:
        break;
    }
    return MaskBackward::apply(g, state, p, feature);
  })[0];
}

Pair dropout(const Tensor& input, double p, const OptGenerator& generator) {
  return masked(input, {}, {}, p, generator, false);
}
Pair feature_dropout(const Tensor& input, double p, const OptGenerator& generator) {
  return masked(input, {}, {}, p, generator, true);
}
Pair dropout_add(const Tensor& input, const Tensor& residual, double p, const OptGenerator& generator) {
  return masked(input, {}, residual, p, generator, false);
}
Pair bias_dropout_add(const Tensor& input, const Tensor& bias, const Tensor& residual, double p,
                      const OptGenerator& generator) {
  return masked(input, bias, residual, p, generator, false);
}
Tensor dropout_backward(const Tensor& grad, const Tensor& state, double p) {
  return mask_backward(grad, state, p, false);
}
Tensor feature_dropout_backward(const Tensor& grad, const Tensor& state, double p) {
  return mask_backward(grad, state, p, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(modekernels, Autograd, m) {
  m.impl("dropout", &dropout);
  m.impl("feature_dropout", &feature_dropout);
  m.impl("dropout_add", &dropout_add);
  m.impl("bias_dropout_add", &bias_dropout_add);
  m.impl("dropout_backward", &dropout_backward);
  m.impl("feature_dropout_backward", &feature_dropout_backward);
}

}  // namespace modekernels::dropout

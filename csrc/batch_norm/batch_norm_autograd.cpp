// Autograd for batch_norm_train and batch_norm_eval (common/autograd.h says why in C++). Their
// gradients are one batch_norm_backward call (batch_norm.h counts its passes over memory). BN+ReLU
// recomputes its ReLU's gate from the input (and bias), so it keeps nothing for the backward but
// its input; BN+add+ReLU keeps its output as the gate. batch_norm_backward's own gradient (double
// backward) is registered in Python (modekernels/_ops.py); it is reached when the backward runs
// with grad mode on (create_graph=True), and skipped otherwise.
#include "common/autograd.h"

#include <torch/library.h>

#include <array>

namespace modekernels::batch_norm {
namespace {

using namespace modekernels::autograd;
using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> call_train(const Tensor& input, const OptTensor& weight,
                                              const OptTensor& bias, double eps,
                                              const OptTensor& residual, bool relu) {
  static const auto train =
      op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, double,
                                            const OptTensor&, bool)>("modekernels::batch_norm_train");
  at::AutoDispatchBelowADInplaceOrView below;
  return train.call(input, weight, bias, eps, residual, relu);
}

Tensor call_eval(const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
                 const OptTensor& weight, const OptTensor& bias, double eps, const OptTensor& residual,
                 bool relu) {
  static const auto eval =
      op<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, double,
                const OptTensor&, bool)>("modekernels::batch_norm_eval");
  at::AutoDispatchBelowADInplaceOrView below;
  return eval.call(input, running_mean, running_var, weight, bias, eps, residual, relu);
}

// The Compose path (autograd.h): relu?(batch_norm(input) + residual?) by torch's operations.
Tensor composed(const Tensor& input, const OptTensor& running_mean, const OptTensor& running_var,
                const OptTensor& weight, const OptTensor& bias, bool training, double eps,
                const OptTensor& residual, bool relu) {
  Tensor out = at::batch_norm(input, weight, bias, running_mean, running_var, training, 0.0, eps,
                              /*cudnn_enabled=*/true);
  if (residual) out = out + *residual;
  return relu ? at::relu(out) : out;
}

OptTensor opt(const Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

// What both modes' backward needs. `edges`: those of weight, bias and residual (autograd.h).
void save(AutogradContext* ctx, bool training, const Tensor& input, const OptTensor& weight,
          const OptTensor& bias, const Tensor& mean, const Tensor& var, double eps,
          const OptTensor& residual, bool relu, const Tensor& out, std::vector<int64_t> edges) {
  const bool recompute_gate = relu && !residual;
  ctx->set_materialize_grads(false);
  ctx->save_for_backward({input, get(weight), recompute_gate ? get(bias) : Tensor(), mean, var,
                          relu && residual ? out : Tensor()});
  ctx->saved_data["training"] = training;
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["recompute_gate"] = recompute_gate;
  ctx->saved_data["edges"] = std::move(edges);
}

// (grad_input, grad_weight, grad_bias, grad_residual), undefined where not needed.
variable_list grads(AutogradContext* ctx, const Tensor& grad) {
  if (!grad.defined()) return variable_list(4);
  const variable_list saved = ctx->get_saved_variables();
  const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &gate = saved[5];
  // The batch statistics come back from saving as outputs of the forward's node; detached, so
  // that a gradient that depends on nothing that requires grad (grad_bias) records no graph, as
  // torch's does (the double backward takes their dependence on the input by itself).
  const Tensor mean = saved[3].detach(), var = saved[4].detach();
  const std::vector<int64_t> edge = ctx->saved_data["edges"].toIntVector();
  const std::array<bool, 3> mask = {ctx->needs_input_grad(0), needs_grad(ctx, edge[0]),
                                    needs_grad(ctx, edge[1])};
  const bool residual = needs_grad(ctx, edge[2]);
  // The residual's gradient is grad through the ReLU's gate, from the pass of grad_input.
  const bool fused_residual = residual && gate.defined();
  const double eps = ctx->saved_data["eps"].toDouble();
  const bool training = ctx->saved_data["training"].toBool();
  const bool recompute_gate = ctx->saved_data["recompute_gate"].toBool();
  static const auto backward =
      op<std::tuple<Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, double, bool,
          std::array<bool, 3>, const OptTensor&, const OptTensor&, std::optional<int64_t>,
          const OptTensor&, bool, bool, const OptTensor&)>("modekernels::batch_norm_backward");
  variable_list result = linear_in_grad(grad, [&](const Tensor& dy) -> variable_list {
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();  // no double backward to record
    auto [gi, gw, gb, gr] =
        backward.call(dy, input, mean, var, opt(weight), eps, training, mask, std::nullopt,
                      std::nullopt, std::nullopt, opt(gate), fused_residual, recompute_gate, opt(bias));
    return {mask[0] ? gi : Tensor(), mask[1] ? gw : Tensor(), mask[2] ? gb : Tensor(),
            fused_residual ? gr : Tensor()};
  });
  if (residual && !gate.defined()) result[3] = grad;
  return result;
}

}  // namespace

// The Functions, named (not anonymous) for their nodes' names in the autograd graph.

// (input, weight, bias, eps, residual, relu) -> (output, mean, var).
struct Train : torch::autograd::Function<Train> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, double eps, const OptTensor& residual,
                               bool relu) {
    auto [out, mean, var] = call_train(input, weight, bias, eps, residual, relu);
    auto e = edges(input, weight, bias, residual);
    save(ctx, true, input, weight, bias, mean, var, eps, residual, relu, out, {e[1], e[2], e[3]});
    return {out, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list g = grads(ctx, grad_outputs[0]);
    return {g[0], g[1], g[2], Tensor(), g[3], Tensor()};
  }
};

// (input, running_mean, running_var, weight, bias, eps, residual, relu) -> output.
struct Eval : torch::autograd::Function<Eval> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& running_mean,
                               const Tensor& running_var, const OptTensor& weight,
                               const OptTensor& bias, double eps, const OptTensor& residual,
                               bool relu) {
    Tensor out = call_eval(input, running_mean, running_var, weight, bias, eps, residual, relu);
    auto e = edges(input, running_mean, running_var, weight, bias, residual);
    save(ctx, false, input, weight, bias, running_mean, running_var, eps, residual, relu, out,
         {e[3], e[4], e[5]});
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list g = grads(ctx, grad_outputs[0]);
    return {g[0], Tensor(), Tensor(), g[1], g[2], Tensor(), g[3], Tensor()};
  }
};

namespace {

std::tuple<Tensor, Tensor, Tensor> batch_norm_train(const Tensor& input, const OptTensor& weight,
                                                    const OptTensor& bias, double eps,
                                                    const OptTensor& residual, bool relu) {
  switch (path(input, weight, bias, residual)) {
    case Path::Direct:
      return call_train(input, weight, bias, eps, residual, relu);
    case Path::Compose: {  // the op for its checks and the statistics of the running update
      auto [out, mean, var] = call_train(input, weight, bias, eps, residual, relu);
      return {composed(input, std::nullopt, std::nullopt, weight, bias, true, eps, residual, relu),
              mean, var};
    }
    case Path::Record:
      break;
  }
  // mean and var are not differentiable. Detached rather than marked so in the Function, which
  // compiled autograd (torch._dynamo.compiled_autograd) refuses.
  auto out = Train::apply(input, weight, bias, eps, residual, relu);
  return {out[0], out[1].detach(), out[2].detach()};
}

Tensor batch_norm_eval(const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
                       const OptTensor& weight, const OptTensor& bias, double eps,
                       const OptTensor& residual, bool relu) {
  switch (path(input, running_mean, running_var, weight, bias, residual)) {
    case Path::Direct:
      return call_eval(input, running_mean, running_var, weight, bias, eps, residual, relu);
    case Path::Compose:  // the op for its checks
      call_eval(input, running_mean, running_var, weight, bias, eps, residual, relu);
      return composed(input, running_mean, running_var, weight, bias, false, eps, residual, relu);
    case Path::Record:
      break;
  }
  return Eval::apply(input, running_mean, running_var, weight, bias, eps, residual, relu)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(modekernels, Autograd, m) {
  m.impl("batch_norm_train", &batch_norm_train);
  m.impl("batch_norm_eval", &batch_norm_eval);
}

}  // namespace modekernels::batch_norm

// What the ops' C++ autograd kernels share (dropout/dropout_autograd.cpp,
// batch_norm/batch_norm_autograd.cpp).
//
// Why C++: the Python autograd wrapper that torch.library.register_autograd installs cost about
// 25 us per call in each direction (measured on 2x8x4x4: our op 3.5 us below autograd, 32 us
// through it), which dominates small layers and would leave a GPU waiting on the host.
//
// Each kernel takes one of three paths (`path` below). Without grad mode or an input that
// requires grad, it calls the op below autograd (Direct). Otherwise it records a
// torch::autograd::Function (Record), except under a functorch transform (torch.func.grad, vjp,
// jacrev, hessian), which refuses any C++ Function: there it gives its differentiable outputs as
// torch operations, which functorch differentiates itself, the op still running below autograd
// for its checks, statistics or mask (Compose). Forward-mode AD (a tangent on an input) also
// takes Compose, whose torch operations carry the tangent; torch.library has no way to register
// a forward-mode formula. The backward formulas are linear in the incoming gradient, so a
// gradient with a tangent (forward-over-reverse) goes through them twice (linear_in_grad).
#pragma once

#include <ATen/ATen.h>
#include <ATen/FuncTorchTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <vector>

namespace modekernels::autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// The op modekernels::<name> with kernel signature Sig.
template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

inline const at::Tensor& get(const at::Tensor& t) { return t; }
inline at::Tensor get(const OptTensor& t) { return t.value_or(at::Tensor()); }

// Whether a functorch transform would refuse a C++ Function here: the check Function::apply
// makes, which raises (only ever inside a transform).
inline bool under_functorch() {
  const auto& functorch = at::functorch::functorchTLSAccessor();
  if (!functorch) return false;
  try {
    functorch->checkSupportsCppAutogradFunction();
    return false;
  } catch (const c10::Error&) {
    return true;
  }
}

// The path of a call (above).
enum class Path { Direct, Record, Compose };

template <typename... Ts>
Path path(const Ts&... tensors) {
  bool grad = false;
  bool tangent = false;
  for (const at::Tensor& t : {get(tensors)...}) {
    if (!t.defined()) continue;
    grad = grad || t.requires_grad();
    tangent = tangent || t._fw_grad(/*level=*/0).defined();
  }
  grad = grad && at::GradMode::is_enabled();
  if (tangent || (grad && under_functorch())) return Path::Compose;
  return grad ? Path::Record : Path::Direct;
}

// The index among the recorded inputs (the Function's edges, defined tensors only) of each of
// `tensors`, or -1 for an absent one: what AutogradContext::needs_input_grad takes.
template <typename... Ts>
std::vector<int64_t> edges(const Ts&... tensors) {
  std::vector<int64_t> out;
  int64_t next = 0;
  for (const at::Tensor& t : {get(tensors)...}) out.push_back(t.defined() ? next++ : -1);
  return out;
}

inline bool needs_grad(AutogradContext* ctx, int64_t edge) {
  return edge >= 0 && ctx->needs_input_grad(edge);
}

// f(grad) -> gradients, for f linear in grad. With a forward-mode tangent on grad, f runs on the
// primal and on the tangent, and each defined result is their dual.
template <typename F>
variable_list linear_in_grad(const at::Tensor& grad, const F& f) {
  const at::Tensor& tangent = grad._fw_grad(/*level=*/0);
  if (!tangent.defined()) return f(grad);
  variable_list out = f(grad._fw_primal(/*level=*/0));
  const variable_list t_out = f(tangent);
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i].defined() && t_out[i].defined()) out[i] = at::_make_dual(out[i], t_out[i], 0);
  }
  return out;
}

}  // namespace modekernels::autograd

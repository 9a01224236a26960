// BatchNorm: the layout every kernel sees, the backend interface, and the op bodies both
// backends reuse (checks, allocation, and the order of passes).
//
// Passes over memory (x, dy, y, dx are activation-sized; everything else is per-channel):
//   train forward:    moments (read x) + affine (read x, write y)          = 2 reads, 1 write
//                     (CPU, small channels-first channels: 1 read, 1 write; see train_resident)
//   eval forward:     affine (read x, write y)                             = 1 read,  1 write
//   train backward:   grad_sums (read dy, x) + affine (read dy, x, write dx)
//   eval backward:    affine (read dy, write dx) [+ grad_sums (read dy, x) if weight/bias need grads]
// The fused variants add the residual to the forward's elementwise read. BN+ReLU's backward
// recomputes the ReLU's gate from x (no extra read). BN+add+ReLU's reads its saved output as the
// gate in the gradient-sums pass, which also writes the gated dy (the residual's gradient); the
// elementwise pass reads that in dy's place, with no gate:
//   train backward:   grad_sums (read dy, x, y; write gated dy) + affine (read it, x; write dx)
// (Read in both passes, with dx and the gated dy both written by the second, float32's training
// step on 8x256x56x56 channels_last took 9.6-10.6 ms on the Intel Xeon VM, 8.1-9.2 ms so: a
// loop that stores two streams ran far below a copy's speed there; 2026-12-06.) Where no
// gradient sums are taken (eval without weight and bias gradients, or sums given), the
// elementwise pass reads the gate and writes the gated dy itself.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "batch_norm/batch_norm_math.h"

#include <array>
#include <optional>
#include <tuple>

namespace modekernels::batch_norm {

// The input as (N, C, S) with S the product of the spatial sizes. Memory is either (N, C, S)
// (channels_last == false) or (N, S, C) (channels_last == true: channels_last, channels_last_3d,
// and every input with S == 1, such as (N, C)).
struct Layout {
  int64_t N, C, S;
  bool channels_last;
};

// The ReLU gate of a fused backward: dy counts only where the gate is open. Without coeffs,
// `tensor` is the forward output, open where > 0 (BN+add+ReLU). With coeffs, the forward's (4, C)
// coefficients, `tensor` is the input x, open where relu_open (batch_norm_math.h) says the forward
// ReLU passed it (BN+ReLU, which so keeps nothing for the backward but its input).
struct Gate {
  at::Tensor tensor, coeffs;
};

// The kernels' view of a Gate over scalar_t inputs.
template <typename scalar_t>
using GateOf = GateView<scalar_t, at::opmath_type<scalar_t>>;

template <typename scalar_t>
GateOf<scalar_t> gate_view(const Gate& gate) {
  using T = at::opmath_type<scalar_t>;
  return {gate.tensor.defined() ? gate.tensor.const_data_ptr<scalar_t>() : nullptr,
          gate.coeffs.defined() ? gate.coeffs.const_data_ptr<T>() : nullptr,
          gate.coeffs.defined() ? gate.coeffs.size(1) : 0};
}

// The operands of the elementwise pass (batch_norm_math.h), any of them undefined when absent:
//   out = relu?(gated(p) * a + (q - m) * b + d + residual),  gated(p) = p where the gate is open.
// The forward of BN+ReLU and BN+add+ReLU uses residual and relu; their backward uses the gate, so
// the pre-activation tensor is never stored. A pass with p and a gate may also write gated(p) to
// gated_out (dense like p): the residual's gradient, at the cost of one store.
struct Operands {
  at::Tensor p, q;
  Gate gate;
  at::Tensor residual;
  bool relu = false;
  at::Tensor gated_out;
};

// The kernels' view of Operands over scalar_t inputs, absent operands null.
template <typename scalar_t>
struct AffinePtrs {
  const scalar_t* p;
  const scalar_t* q;
  GateOf<scalar_t> gate;
  const scalar_t* residual;
  bool relu;
  scalar_t* gated_out;  // or null: also write the gated p (the fused residual's gradient)
};

template <typename scalar_t>
AffinePtrs<scalar_t> affine_ptrs(const Operands& in) {
  const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
  return {ptr(in.p), ptr(in.q), gate_view<scalar_t>(in.gate), ptr(in.residual), in.relu,
          in.gated_out.defined() ? in.gated_out.data_ptr<scalar_t>() : nullptr};
}

// A backend's kernels. Per-channel tensors are (C,) in the opmath dtype (float for
// float/half/bfloat16 inputs, double for double); `coeffs` is (4, C), see batch_norm_math.h.
// p, q, x and dy are dense in `layout`; undefined tensors stand for absent operands.
struct Backend {
  void (*moments)(const at::Tensor& x, const Layout& layout, const at::Tensor& mean,
                  const at::Tensor& var);
  // Sums of dy, with dy taken as 0 where the gate (if any) is closed: the ReLU backward. With a
  // saved gate, gated_out may be given (dense like dy, else undefined): the gated dy is written
  // there, bit for bit dy's where the gate is open and +0 where it is closed.
  void (*grad_sums)(const at::Tensor& dy, const Gate& gate, const at::Tensor& x,
                    const Layout& layout, const at::Tensor& mean, const at::Tensor& sum_dy,
                    const at::Tensor& sum_dy_xmu, const at::Tensor& gated_out);
  void (*forward_coeffs)(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& weight,
                         const at::Tensor& bias, double eps, const at::Tensor& coeffs);
  void (*backward_coeffs)(bool train, const at::Tensor& mean, const at::Tensor& var,
                          const at::Tensor& weight, double eps, const at::Tensor& sum_dy,
                          const at::Tensor& sum_dy_xmu, int64_t count, const at::Tensor& coeffs,
                          const at::Tensor& grad_weight, const at::Tensor& grad_bias);
  // out (and in.gated_out) never alias an operand: the CPU kernel may compute an element twice.
  void (*affine)(const Operands& in, const Layout& layout, const at::Tensor& coeffs,
                 const at::Tensor& out);
  // With num_batches_tracked (momentum=None) the factor is the cumulative average
  // 1 / num_batches_tracked, read on the device; without it, `factor` (any value, as in torch).
  void (*update_running)(const at::Tensor& running_mean, const at::Tensor& running_var,
                         const at::Tensor& mean, const at::Tensor& var, int64_t count,
                         double factor, const at::Tensor& num_batches_tracked);
  // Optional (null where a backend has none): a whole training forward (mean, var and out from
  // in.q = x) or training backward (from in.p = dy, in.q = x, in.gate, and gated_out as
  // grad_sums takes it, the elementwise part then reading it as p with no gate) in one pass over
  // memory, for layouts that suit it. They return false, having written nothing, when the layout
  // does not suit them; the op bodies then run the passes above.
  bool (*train_resident)(const Operands& in, const Layout& layout, const at::Tensor& weight,
                         const at::Tensor& bias, double eps, const at::Tensor& mean,
                         const at::Tensor& var, const at::Tensor& out);
  bool (*backward_resident)(const Operands& in, const Layout& layout, const at::Tensor& mean,
                            const at::Tensor& var, const at::Tensor& weight, double eps,
                            const at::Tensor& gated_out, const at::Tensor& grad_input,
                            const at::Tensor& grad_weight, const at::Tensor& grad_bias);
};

using OptTensor = std::optional<at::Tensor>;

// For the backends' per-channel kernels: a typed pointer or null for an absent tensor, and a call
// of fn((P*)nullptr) with P the dtype of `param` (or of `fallback` when param is absent).
template <typename P>
P* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<P>() : nullptr;
}

template <typename Fn>
void dispatch_param(const at::Tensor& param, at::ScalarType fallback, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16,
                                  param.defined() ? param.scalar_type() : fallback,
                                  "modekernels_bn_params", [&] { fn(static_cast<scalar_t*>(nullptr)); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> train(const at::Tensor& input, const OptTensor& weight,
                                                     const OptTensor& bias, double eps,
                                                     const OptTensor& residual, bool relu,
                                                     const Backend& be);
at::Tensor eval(const at::Tensor& input, const at::Tensor& running_mean,
                const at::Tensor& running_var, const OptTensor& weight, const OptTensor& bias,
                double eps, const OptTensor& residual, bool relu, const Backend& be);
std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& input, const Backend& be);
std::tuple<at::Tensor, at::Tensor> grad_sums(const at::Tensor& grad_output, const at::Tensor& input,
                                             const at::Tensor& mean, const Backend& be);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& var, const OptTensor& weight, double eps, bool training,
    std::array<bool, 3> output_mask, const OptTensor& sum_dy, const OptTensor& sum_dy_xmu,
    std::optional<int64_t> count, const OptTensor& relu_output, bool residual_grad, bool relu,
    const OptTensor& bias, const Backend& be);
void update_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                  const at::Tensor& var, int64_t count, std::optional<double> momentum,
                  const OptTensor& num_batches_tracked, const Backend& be);

// The schema-typed entry points a backend registers with TORCH_LIBRARY_IMPL.
template <const Backend& be>
struct Ops {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_train(
      const at::Tensor& input, const OptTensor& weight, const OptTensor& bias, double eps,
      const OptTensor& residual, bool relu) {
    return train(input, weight, bias, eps, residual, relu, be);
  }
  static at::Tensor batch_norm_eval(const at::Tensor& input, const at::Tensor& running_mean,
                                    const at::Tensor& running_var, const OptTensor& weight,
                                    const OptTensor& bias, double eps, const OptTensor& residual,
                                    bool relu) {
    return eval(input, running_mean, running_var, weight, bias, eps, residual, relu, be);
  }
  static std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& input) {
    return stats(input, be);
  }
  static std::tuple<at::Tensor, at::Tensor> batch_norm_grad_sums(const at::Tensor& grad_output,
                                                                 const at::Tensor& input,
                                                                 const at::Tensor& mean) {
    return grad_sums(grad_output, input, mean, be);
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
      const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
      const at::Tensor& var, const OptTensor& weight, double eps, bool training,
      std::array<bool, 3> output_mask, const OptTensor& sum_dy, const OptTensor& sum_dy_xmu,
      std::optional<int64_t> count, const OptTensor& relu_output, bool residual_grad, bool relu,
      const OptTensor& bias) {
    return backward(grad_output, input, mean, var, weight, eps, training, output_mask, sum_dy,
                    sum_dy_xmu, count, relu_output, residual_grad, relu, bias, be);
  }
  static void batch_norm_update_stats_(at::Tensor& running_mean, at::Tensor& running_var,
                                       const at::Tensor& mean, const at::Tensor& var,
                                       int64_t count, std::optional<double> momentum,
                                       const OptTensor& num_batches_tracked) {
    update_stats(running_mean, running_var, mean, var, count, momentum, num_batches_tracked, be);
  }

  static void register_all(torch::Library& m) {
    m.impl("batch_norm_train", &batch_norm_train);
    m.impl("batch_norm_eval", &batch_norm_eval);
    m.impl("batch_norm_backward", &batch_norm_backward);
    m.impl("batch_norm_stats", &batch_norm_stats);
    m.impl("batch_norm_grad_sums", &batch_norm_grad_sums);
    m.impl("batch_norm_update_stats_", &batch_norm_update_stats_);
  }
};

}  // namespace modekernels::batch_norm

// BatchNorm op bodies shared by the CPU and CUDA backends. Every check is here, written once,
// and runs before anything is allocated or written; messages follow torch's where torch has one.
#include "batch_norm/batch_norm.h"

#include "common/checks.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <charconv>
#include <string>

namespace modekernels::batch_norm {
namespace {

// A double as Python's repr writes it (the shortest round-trip digits, "0.0" rather than "0"),
// for messages that torch raises from Python with an f-string. Standard libraries without
// floating-point to_chars (libstdc++ before GCC 11) write six significant digits instead.
std::string py_float(double v) {
#if defined(__cpp_lib_to_chars)
  char buf[32];
  std::string s(buf, std::to_chars(buf, buf + sizeof(buf), v).ptr);
#else
  std::string s = c10::str(v);
#endif
  if (s.find_first_not_of("-0123456789") == std::string::npos) s += ".0";
  return s;
}

bool is_reduced(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16;
}

void check_input(const at::Tensor& input, const char* name) {
  check_defined(input, "batch_norm", name);
  const auto t = input.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || is_reduced(t),
                   "modekernels batch_norm: expected ", name,
                   " to be float32, float64, float16 or bfloat16, but got ", t);
  TORCH_CHECK_VALUE(input.dim() >= 2, "modekernels batch_norm: expected ", name,
                    " with at least 2 dimensions (N, C, ...), but got ", input.dim(), "D");
}

// A per-channel tensor's shape: (C,), with torch's message for another element count.
void check_channel_shape(const at::Tensor& t, const char* name, int64_t C) {
  check_defined(t, "batch_norm", name);
  TORCH_CHECK(t.numel() == C, name, " should contain ", C, " elements not ", t.numel());
  TORCH_CHECK(t.dim() == 1, "modekernels batch_norm: expected ", name, " to be 1-D, but got shape ",
              t.sizes());
}

// A per-channel tensor: (C,), on input's device, in input's dtype or (for float16/bfloat16
// inputs) float32.
void check_channel(const at::Tensor& t, const char* name, const at::Tensor& input) {
  check_channel_shape(t, name, input.size(1));
  TORCH_CHECK(t.device() == input.device(), "modekernels batch_norm: expected ", name, " on ",
              input.device(), " like input, but got ", t.device());
  const auto ok = t.scalar_type() == input.scalar_type() ||
                  (is_reduced(input.scalar_type()) && t.scalar_type() == at::kFloat);
  TORCH_CHECK_TYPE(ok, "modekernels batch_norm: expected ", name, " to be ", input.scalar_type(),
                   is_reduced(input.scalar_type()) ? " or float32" : "", " like input, but got ",
                   t.scalar_type());
}

void check_params(const at::Tensor& input, const OptTensor& weight, const OptTensor& bias) {
  if (weight && weight->defined()) check_channel(*weight, "weight", input);
  if (bias && bias->defined()) check_channel(*bias, "bias", input);
  if (weight && weight->defined() && bias && bias->defined()) {
    TORCH_CHECK_TYPE(weight->scalar_type() == bias->scalar_type(),
                     "modekernels batch_norm: expected weight and bias of one dtype, but got ",
                     weight->scalar_type(), " and ", bias->scalar_type());
  }
}

void check_grad(const at::Tensor& grad_output, const at::Tensor& input) {
  check_input(input, "input");
  check_defined(grad_output, "batch_norm", "grad_output");
  TORCH_CHECK(grad_output.sizes() == input.sizes() && grad_output.scalar_type() == input.scalar_type() &&
                  grad_output.device() == input.device(),
              "modekernels batch_norm: expected grad_output like input (", input.sizes(), ", ",
              input.scalar_type(), "), but got ", grad_output.sizes(), ", ", grad_output.scalar_type());
}

int64_t per_channel_count(const at::Tensor& input) {
  return input.size(1) == 0 ? 0 : input.numel() / input.size(1);
}

// The memory format the kernels walk, and the outputs': channels-last for channels_last(_3d)
// inputs, contiguous otherwise. Anything else is copied into it. Where strides are ambiguous
// (pytorch/pytorch#63224: a channels-last (N, C, H, 1) whose W stride is 1 suggests contiguous),
// torch's CPU batch_norm takes the format in which the input is already dense, and so do we
// there; on CUDA, suggest_memory_format, as torch's cuDNN path. Where each (n, c) holds one
// element (2-D inputs, (N, C, 1), (N, C, 1, 1)) the channels are innermost either way, and the
// kernels walk the memory as channels-last (N, 1, C): read channels-first, every row would be one
// element long.
at::MemoryFormat kernel_format(const at::Tensor& t) {
  if (t.dim() == 2) return at::MemoryFormat::Contiguous;
  if (t.is_cpu()) {
    for (const auto fmt : {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast,
                           at::MemoryFormat::ChannelsLast3d}) {
      if (t.is_contiguous(fmt)) return fmt;
    }
  }
  return t.suggest_memory_format();
}

// grad_input's memory format, as torch's CPU batch_norm backward gives it: the input's kernel
// format `fmt` where input and grad_output are both dense and suggest the same format, else the
// input's suggest_memory_format. Only ambiguous strides tell the two apart; on CUDA it is `fmt`.
at::MemoryFormat grad_input_format(const at::Tensor& grad_output, const at::Tensor& input,
                                   at::MemoryFormat fmt) {
  if (!input.is_cpu() || input.dim() == 2) return fmt;
  const bool alike = input.is_contiguous(fmt) &&
                     grad_output.is_contiguous(kernel_format(grad_output)) &&
                     input.suggest_memory_format() == grad_output.suggest_memory_format();
  return alike ? fmt : input.suggest_memory_format();
}

Layout layout_of(const at::Tensor& t) {
  const int64_t N = t.size(0);
  const int64_t C = t.size(1);
  const int64_t S = C == 0 || N == 0 ? 0 : t.numel() / (N * C);
  const bool cl = t.dim() == 2 || S == 1 || kernel_format(t) != at::MemoryFormat::Contiguous;
  return {N, C, t.dim() == 2 ? 1 : S, cl};
}

at::Tensor dense(const at::Tensor& t, at::MemoryFormat fmt) {
  return t.contiguous(fmt);
}

// Per-channel tensors as the kernels read them: dense (a strided or expanded view is copied).
at::Tensor opt(const OptTensor& t) {
  return t && t->defined() ? t->contiguous() : at::Tensor();
}

at::Tensor channel_in(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

// A tensor shaped like input (a residual, a saved output) in the kernels' memory format.
at::Tensor like_input(const OptTensor& t, const char* name, const at::Tensor& input,
                      at::MemoryFormat fmt) {
  if (!t || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->sizes() == input.sizes() && t->scalar_type() == input.scalar_type() &&
                  t->device() == input.device(),
              "modekernels batch_norm: expected ", name, " like input (", input.sizes(), ", ",
              input.scalar_type(), ", ", input.device(), "), but got ", t->sizes(), ", ",
              t->scalar_type(), ", ", t->device());
  return dense(*t, fmt);
}

at::Tensor channel_empty(const at::Tensor& input, at::ScalarType dtype, int64_t rows = 0) {
  const int64_t C = input.size(1);
  auto options = input.options().dtype(dtype);
  return rows ? at::empty({rows, C}, options) : at::empty({C}, options);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& input, const Backend& be) {
  check_input(input, "input");
  const at::Tensor x = dense(input, kernel_format(input));
  const auto acc = at::toOpMathType(input.scalar_type());
  at::Tensor mean = channel_empty(input, acc);
  at::Tensor var = channel_empty(input, acc);
  if (x.numel() == 0) {
    mean.zero_();
    var.zero_();
  } else {
    be.moments(x, layout_of(x), mean, var);
  }
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> grad_sums(const at::Tensor& grad_output, const at::Tensor& input,
                                             const at::Tensor& mean, const Backend& be) {
  check_grad(grad_output, input);
  check_channel(mean, "mean", input);
  const auto fmt = kernel_format(input);
  const at::Tensor x = dense(input, fmt);
  const auto acc = at::toOpMathType(input.scalar_type());
  at::Tensor sum_dy = channel_empty(input, acc);
  at::Tensor sum_dy_xmu = channel_empty(input, acc);
  if (x.numel() == 0) {
    sum_dy.zero_();
    sum_dy_xmu.zero_();
  } else {
    be.grad_sums(dense(grad_output, fmt), Gate(), x, layout_of(x), channel_in(mean, acc), sum_dy,
                 sum_dy_xmu, at::Tensor());
  }
  return {sum_dy, sum_dy_xmu};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> train(const at::Tensor& input, const OptTensor& weight,
                                                     const OptTensor& bias, double eps,
                                                     const OptTensor& residual, bool relu,
                                                     const Backend& be) {
  check_input(input, "input");
  check_params(input, weight, bias);
  TORCH_CHECK_VALUE(per_channel_count(input) != 1,
                    "Expected more than 1 value per channel when training, got input size torch.Size(",
                    input.sizes(), ")");
  // A NaN eps passes, as in torch's batch_norm (eps <= 0 raises), and gives NaN outputs.
  TORCH_CHECK_VALUE(!(eps <= 0.0), "batch_norm eps must be positive during training, but got ",
                    py_float(eps));
  const auto fmt = kernel_format(input);
  const at::Tensor r = like_input(residual, "residual", input, fmt);
  const at::Tensor x = dense(input, fmt);
  const Layout layout = layout_of(x);
  const Operands in{at::Tensor(), x, Gate(), r, relu};
  const auto acc = at::toOpMathType(input.scalar_type());
  at::Tensor mean = channel_empty(input, acc);
  at::Tensor var = channel_empty(input, acc);
  at::Tensor out = at::empty_like(x, fmt);
  if (x.numel() == 0) {
    mean.zero_();
    var.zero_();
    return {out, mean, var};
  }
  if (be.train_resident && be.train_resident(in, layout, opt(weight), opt(bias), eps, mean, var, out)) {
    return {out, mean, var};
  }
  be.moments(x, layout, mean, var);
  at::Tensor coeffs = channel_empty(input, acc, 4);
  be.forward_coeffs(mean, var, opt(weight), opt(bias), eps, coeffs);
  be.affine(in, layout, coeffs, out);
  return {out, mean, var};
}

at::Tensor eval(const at::Tensor& input, const at::Tensor& running_mean,
                const at::Tensor& running_var, const OptTensor& weight, const OptTensor& bias,
                double eps, const OptTensor& residual, bool relu, const Backend& be) {
  check_input(input, "input");
  check_channel(running_mean, "running_mean", input);
  check_channel(running_var, "running_var", input);
  check_params(input, weight, bias);
  TORCH_CHECK_VALUE(!(eps < 0.0), "batch_norm eps must be non-negative, but got ", py_float(eps));
  const auto fmt = kernel_format(input);
  const at::Tensor r = like_input(residual, "residual", input, fmt);
  const at::Tensor x = dense(input, fmt);
  at::Tensor out = at::empty_like(x, fmt);
  if (x.numel() == 0) return out;
  const auto acc = at::toOpMathType(input.scalar_type());
  at::Tensor coeffs = channel_empty(input, acc, 4);
  be.forward_coeffs(channel_in(running_mean, acc), channel_in(running_var, acc), opt(weight),
                    opt(bias), eps, coeffs);
  be.affine({at::Tensor(), x, Gate(), r, relu}, layout_of(x), coeffs, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& var, const OptTensor& weight, double eps, bool training,
    std::array<bool, 3> output_mask, const OptTensor& sum_dy_given,
    const OptTensor& sum_dy_xmu_given, std::optional<int64_t> count_given,
    const OptTensor& relu_output, bool residual_grad, bool relu, const OptTensor& bias,
    const Backend& be) {
  check_grad(grad_output, input);
  check_channel(mean, "mean", input);
  check_channel(var, "var", input);
  check_params(input, weight, bias);
  const at::Tensor w = opt(weight);
  const bool want_dx = output_mask[0];
  const bool want_dw = output_mask[1] && w.defined();
  const bool want_db = output_mask[2];
  const auto param_dtype = w.defined() ? w.scalar_type() : at::toOpMathType(input.scalar_type());

  const auto fmt = kernel_format(input);
  const at::Tensor x = dense(input, fmt);
  const at::Tensor dy = dense(grad_output, fmt);
  const at::Tensor saved_gate = like_input(relu_output, "relu_output", input, fmt);
  TORCH_CHECK(!(relu && saved_gate.defined()),
              "modekernels batch_norm: give the ReLU's gate as relu_output or relu=True, not both");
  TORCH_CHECK(!residual_grad || saved_gate.defined(),
              "modekernels batch_norm: residual_grad needs relu_output (the gate it applies)");
  const Layout layout = layout_of(x);
  const auto acc = at::toOpMathType(input.scalar_type());
  const at::Tensor mean_acc = channel_in(mean, acc);
  const at::Tensor var_acc = channel_in(var, acc);
  Gate gate{saved_gate, at::Tensor()};
  if (relu) {  // the forward's coefficients, computed as the forward computed them
    gate = {x, channel_empty(input, acc, 4)};
    be.forward_coeffs(mean_acc, var_acc, w, opt(bias), eps, gate.coeffs);
  }

  at::Tensor grad_input = want_dx ? at::empty_like(x, fmt) : at::empty({0}, input.options());
  // Written in the kernels' format, copied where torch's grad_input has another (rare, above).
  const auto dx_fmt = grad_input_format(grad_output, input, fmt);
  const auto in_format = [&](const at::Tensor& t) {
    return want_dx && dx_fmt != fmt ? at::empty_like(t, dx_fmt).copy_(t) : t;
  };
  at::Tensor grad_weight = want_dw ? channel_empty(input, param_dtype) : at::empty({0}, input.options());
  at::Tensor grad_bias = want_db ? channel_empty(input, param_dtype) : at::empty({0}, input.options());
  // Sums over the whole (possibly distributed) batch may be given; otherwise they are this batch's.
  const bool given = sum_dy_given && sum_dy_given->defined();
  TORCH_CHECK(given == (sum_dy_xmu_given && sum_dy_xmu_given->defined()) && given == count_given.has_value(),
              "modekernels batch_norm: sum_dy, sum_dy_xmu and count go together");
  if (given) {
    check_channel(*sum_dy_given, "sum_dy", input);
    check_channel(*sum_dy_xmu_given, "sum_dy_xmu", input);
  }
  const bool sums_pass = !given && ((training && want_dx) || want_dw || want_db) && x.numel() > 0;
  // A saved gate is applied once, giving the gated dy (the residual's gradient). The gradient-sums
  // pass writes it as it reads the gate, and the elementwise pass then reads it as dy, with no
  // gate; without that pass, the elementwise pass applies the gate and writes the gated dy (one
  // pass, not two: eval's backward of float32 BatchNormAddReLU2d on 8x256x56x56 channels_last took
  // 3.7 ms so, 4.6 ms through threshold_backward), or, without grad_input, torch's ReLU backward
  // does (0 where the output is <= 0, so open for NaN, as relu_passes; at::where(y <= 0, 0, dy)
  // took 9x its time on the CPU).
  at::Tensor gated;
  if (saved_gate.defined() && (residual_grad || (want_dx && sums_pass))) {
    gated = sums_pass || want_dx ? at::empty_like(x, fmt)
                                 : dense(at::threshold_backward(dy, saved_gate, 0), fmt);
  }
  const bool gated_by_sums = sums_pass && gated.defined();
  const at::Tensor grad_residual = residual_grad ? gated : at::empty({0}, input.options());
  at::Tensor sum_dy;
  at::Tensor sum_dy_xmu;
  if (given) {
    sum_dy = channel_in(*sum_dy_given, acc);
    sum_dy_xmu = channel_in(*sum_dy_xmu_given, acc);
  } else if (sums_pass) {
    if (training && want_dx && be.backward_resident &&
        be.backward_resident({dy, x, gate}, layout, mean_acc, var_acc, w, eps, gated, grad_input,
                             want_dw ? grad_weight : at::Tensor(), want_db ? grad_bias : at::Tensor())) {
      return {in_format(grad_input), grad_weight, grad_bias, grad_residual};
    }
    sum_dy = channel_empty(input, acc);
    sum_dy_xmu = channel_empty(input, acc);
    be.grad_sums(dy, gate, x, layout, mean_acc, sum_dy, sum_dy_xmu, gated);
  } else {
    sum_dy = at::zeros_like(mean_acc);
    sum_dy_xmu = at::zeros_like(mean_acc);
  }
  at::Tensor coeffs = channel_empty(input, acc, 4);
  be.backward_coeffs(training, mean_acc, var_acc, w, eps, sum_dy, sum_dy_xmu,
                     given ? *count_given : per_channel_count(input), coeffs, want_dw ? grad_weight : at::Tensor(),
                     want_db ? grad_bias : at::Tensor());
  if (want_dx && x.numel() > 0) {
    const at::Tensor q = training ? x : at::Tensor();
    be.affine(gated_by_sums ? Operands{gated, q} : Operands{dy, q, gate, at::Tensor(), false, gated},
              layout, coeffs, grad_input);
  }
  return {in_format(grad_input), grad_weight, grad_bias, grad_residual};
}

void update_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                  const at::Tensor& var, int64_t count, std::optional<double> momentum,
                  const OptTensor& num_batches_tracked, const Backend& be) {
  check_defined(mean, "batch_norm", "mean");
  check_defined(var, "batch_norm", "var");
  const int64_t C = mean.numel();
  TORCH_CHECK(var.numel() == C, "modekernels batch_norm: expected var of ", C, " elements like mean, but got ",
              var.numel());
  check_channel_shape(running_mean, "running_mean", C);
  check_channel_shape(running_var, "running_var", C);
  TORCH_CHECK(running_mean.device() == mean.device() && running_var.device() == mean.device(),
              "modekernels batch_norm: expected running stats on ", mean.device(), ", but got ",
              running_mean.device(), " and ", running_var.device());
  TORCH_CHECK_TYPE(running_mean.scalar_type() == running_var.scalar_type() &&
                       at::isFloatingType(running_mean.scalar_type()),
                   "modekernels batch_norm: expected running_mean and running_var of one floating "
                   "dtype, but got ", running_mean.scalar_type(), " and ", running_var.scalar_type());
  const bool counter = num_batches_tracked && num_batches_tracked->defined();
  if (counter) {
    TORCH_CHECK(num_batches_tracked->numel() == 1 && num_batches_tracked->device() == mean.device(),
                "modekernels batch_norm: expected num_batches_tracked to be a one-element tensor on ",
                mean.device());
  }
  TORCH_CHECK_VALUE(momentum || counter,
                    "modekernels batch_norm: momentum=None (a cumulative average) needs num_batches_tracked");
  TORCH_CHECK_VALUE(count != 1,
                    "Expected more than 1 value per channel when training, got ", count);
  // torch's error for writing into an expanded tensor (one element for several channels), before
  // anything is written (torch's kernel writes such statistics, each channel over the last).
  at::assert_no_internal_overlap(running_mean);
  at::assert_no_internal_overlap(running_var);
  if (counter) num_batches_tracked->add_(1);
  if (count == 0) return;  // an empty batch counts, but has no statistics (as in torch)
  // The kernels write dense running statistics: a strided view is updated through a copy.
  at::Tensor rm = running_mean.contiguous();
  at::Tensor rv = running_var.contiguous();
  // The kernels read the counter as int64 (torch's dtype for it; another is converted).
  be.update_running(rm, rv, mean.contiguous(), var.contiguous(), count, momentum.value_or(0.0),
                    momentum ? at::Tensor() : num_batches_tracked->to(at::kLong));
  if (!rm.is_same(running_mean)) running_mean.copy_(rm);
  if (!rv.is_same(running_var)) running_var.copy_(rv);
}

}  // namespace modekernels::batch_norm

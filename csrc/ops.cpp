// The modekernels op schemas, declared once for every backend, and the Python module `_C`, whose
// import runs the static TORCH_LIBRARY registrations (no pybind: the ops are reached through
// torch.ops.modekernels). Its attribute cpu_capability names the build of the CPU kernels in use
// ("AVX512", "AVX2" or "DEFAULT", common/cpu_capability.h), and stream_bytes the smallest CPU
// output written past the caches (common/stream.h): MODEKERNELS_STREAM_BYTES is read at import, so
// that a value that is not a number of bytes is a ValueError there, not in the middle of an op
// that has already updated running statistics.
//
// Randomness is explicit: ops that draw from a generator carry the nondeterministic_seeded tag and
// return the (seed, offset) they used as an int64[2] `rng_state`, which is all the backward needs.
// The in-place dropouts bump the version counter of their input, as torch's in-place ops do, so
// that autograd refuses a backward through a tensor they changed. batch_norm_update_stats_ leaves
// the running statistics' version counters alone, as torch's BatchNorm does (a graph that saved
// them in eval mode still runs its backward after a training step); num_batches_tracked's is
// bumped by the add_ that increments it, as in torch.
#include <Python.h>
#include <torch/library.h>

#include <vector>

#include "common/cpu_capability.h"
#include "common/stream.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (!module) return nullptr;
  long stream_bytes = 0;
  try {
    stream_bytes = static_cast<long>(modekernels::stream_bytes());
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    Py_DECREF(module);
    return nullptr;
  }
  if (PyModule_AddStringConstant(module, "cpu_capability", modekernels::cpu_capability()) < 0 ||
      PyModule_AddIntConstant(module, "stream_bytes", stream_bytes) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(modekernels, m) {
  // Dropout (csrc/dropout). `dropout` and `dropout_` always drop: eval mode, p == 0 and empty
  // inputs are short-cut in Python, as torch does, so that the input itself is returned.
  m.def("dropout(Tensor input, float p, Generator? generator=None) -> (Tensor output, Tensor rng_state)",
        {at::Tag::nondeterministic_seeded});
  m.def("dropout_(Tensor(a!) input, float p, Generator? generator=None) -> Tensor rng_state",
        {at::Tag::nondeterministic_seeded});
  // Deterministic: multiplies by the mask and scale of the saved rng_state.
  m.def("dropout_backward(Tensor grad_output, Tensor rng_state, float p) -> Tensor");
  // Fused: residual + dropout(input) and residual + dropout(input + bias), bias over the last
  // dimension; their gradients are dropout_backward's (and its sum for the bias).
  m.def("dropout_add(Tensor input, Tensor residual, float p, Generator? generator=None) -> (Tensor output, Tensor rng_state)",
        {at::Tag::nondeterministic_seeded});
  m.def("bias_dropout_add(Tensor input, Tensor bias, Tensor residual, float p, Generator? generator=None) -> (Tensor output, Tensor rng_state)",
        {at::Tag::nondeterministic_seeded});
  // Channel-wise (Dropout1d/2d/3d): one mask per (n, c) of an (N, C, *) input.
  m.def("feature_dropout(Tensor input, float p, Generator? generator=None) -> (Tensor output, Tensor rng_state)",
        {at::Tag::nondeterministic_seeded});
  m.def("feature_dropout_(Tensor(a!) input, float p, Generator? generator=None) -> Tensor rng_state",
        {at::Tag::nondeterministic_seeded});
  m.def("feature_dropout_backward(Tensor grad_output, Tensor rng_state, float p) -> Tensor");

  // BatchNorm (csrc/batch_norm). Statistics come out in the opmath dtype (float32, or float64
  // for float64 inputs); `var` is the biased batch variance. The running-statistics update is its
  // own mutating op so that the compute ops stay functional (and differentiable).
  // With `residual` and/or `relu`, the output is relu(batch_norm(input) + residual), in one pass.
  m.def("batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, float eps, Tensor? residual=None, bool relu=False) -> (Tensor output, Tensor mean, Tensor var)");
  m.def("batch_norm_eval(Tensor input, Tensor running_mean, Tensor running_var, Tensor? weight, Tensor? bias, float eps, Tensor? residual=None, bool relu=False) -> Tensor");
  // Gradients; outputs not asked for in output_mask are returned empty. For a batch spread over
  // several processes, pass the all-reduced sum_dy, sum_dy_xmu and the global per-channel count.
  // After a fused ReLU, grad_output is zero where the ReLU's output was <= 0 (a NaN output lets it
  // through, as torch's ReLU backward). Pass that output as relu_output, or (BN+ReLU, no
  // residual) relu=True and the forward's bias: the gate is then recomputed from input exactly as
  // the forward rounded it. residual_grad (with relu_output) also returns the gated grad_output,
  // the gradient of a fused residual, written by the same pass that computes grad_input; otherwise
  // grad_residual is empty.
  m.def("batch_norm_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor var, Tensor? weight, float eps, bool training, bool[3] output_mask, Tensor? sum_dy=None, Tensor? sum_dy_xmu=None, SymInt? count=None, Tensor? relu_output=None, bool residual_grad=False, bool relu=False, Tensor? bias=None) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
  // The building blocks of a distributed BatchNorm: local statistics and local gradient sums.
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def("batch_norm_grad_sums(Tensor grad_output, Tensor input, Tensor mean) -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  // momentum=None: cumulative average 1 / num_batches_tracked, read on the device (no sync).
  // num_batches_tracked, when given, is incremented.
  m.def("batch_norm_update_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, SymInt count, float? momentum, Tensor(c!)? num_batches_tracked) -> ()");
}

namespace {

// The ADInplaceOrView kernel of an in-place op: runs it, then bumps the version counter of every
// tensor its schema marks as written (torch generates the same for its own in-place ops).
void bump_written(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    const auto* alias = args[i].alias_info();
    const auto& value = (*stack)[first + i];
    if (alias && alias->isWrite() && value.isTensor()) written.push_back(value.toTensor());
  }
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const auto& t : written) {
    if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(modekernels, ADInplaceOrView, m) {
  for (const char* name : {"dropout_", "feature_dropout_"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_written>());
  }
}

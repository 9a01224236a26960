// The modekernels op schemas, declared once for every backend, and the empty Python module `_C`
// whose import runs the static TORCH_LIBRARY registrations (no pybind: the ops are reached
// through torch.ops.modekernels).
//
// Randomness is explicit: ops that draw from a generator carry the nondeterministic_seeded tag and
// return the (seed, offset) they used as an int64[2] `rng_state`, which is all the backward needs.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
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
}

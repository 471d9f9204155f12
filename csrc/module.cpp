// Python module `focal._C`. Importing it loads this library, whose static initialisers register the
// operators (TORCH_LIBRARY / TORCH_LIBRARY_IMPL); the module itself has no functions.
#include <Python.h>

#include <string>

#include <torch/library.h>

#include "box_ops.h"
#include "cpu/isa.h"
#include "focal_ops.h"
#include "softmax_ops.h"

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {

// The instruction set of the CPU kernel copy that runs here, for `python -m focal.info`.
std::string cpu_kernel_isa() { return focal::cpu::isa_name(focal::cpu::isa_for_this_cpu()); }

}  // namespace

// The schemas are defined here, with the module, rather than in focal_ops.cpp, so that the checks of
// focal_ops.cpp can also be linked into the test-only emulated CUDA backend (namespace focal_emu)
// that is loaded next to this module.
TORCH_LIBRARY(focal, m) {
  for (const char* schema : focal::kSchemas) m.def(schema);
  m.def(focal::kSoftmaxFocalLossSchema);
  m.def(focal::kFcosBoxLossesSchema);
  m.def("cpu_kernel_isa() -> str", &cpu_kernel_isa);
}

// Python module `focal._C`. Importing it loads this library, whose static initialisers register the
// operators (TORCH_LIBRARY / TORCH_LIBRARY_IMPL). The module's one function is a diagnostic.
#include <Python.h>

#include "cpu/half_table.h"

namespace {

PyObject* half_table_launches(PyObject*, PyObject*) {
  return PyLong_FromLongLong(focal::cpu::half_table_launches());
}

PyMethodDef methods[] = {
    {"_half_table_launches", half_table_launches, METH_NOARGS,
     "Number of CPU launches served by the 16-bit lookup-table kernel in this process."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

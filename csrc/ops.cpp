// The extension's module and its op library. Each op declares its schemas in its own file
// (csrc/<op>.cpp, a TORCH_LIBRARY_FRAGMENT with the same text as its contract,
// lightnet_ops/ops/<op>.py); device kernels register implementations in csrc/cpu/*.cpp and
// csrc/cuda/*.cu; the fakes come from the contracts.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import lightnet_ops._C` loads this shared library, which runs the registrations of every file.
// The module itself has no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// Claims the lightnet_ops namespace (a second library defining it fails to load); the ops' files
// add to it with fragments.
TORCH_LIBRARY(lightnet_ops, m) {}

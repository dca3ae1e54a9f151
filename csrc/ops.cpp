// The extension's module and its op library. Each op declares its schemas in its own file
// (csrc/<op>.cpp, a TORCH_LIBRARY_FRAGMENT with the same text as its contract,
// lightnet_ops/ops/<op>.py); device kernels register implementations in csrc/cpu/*.cpp and
// csrc/cuda/*.cu; the fakes come from the contracts.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "lightnet_ops/convnet.h"

namespace {

// Releases the GIL for its lifetime (exceptions included) while the kernels run, as torch.ops does.
class GilRelease {
 public:
  GilRelease() : state_(PyEval_SaveThread()) {}
  ~GilRelease() { PyEval_RestoreThread(state_); }
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;

 private:
  PyThreadState* state_;
};

// The items of a list or tuple; `what` names it in errors.
std::vector<PyObject*> sequence_items(PyObject* seq, const char* what) {
  TORCH_CHECK_TYPE(PyList_Check(seq) || PyTuple_Check(seq), "convnet_forward: ", what, " must be a list or tuple");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  return std::vector<PyObject*>(items, items + n);
}

const at::Tensor& as_tensor(PyObject* obj, const char* what) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), "convnet_forward: ", what, " must be a Tensor, got ", Py_TYPE(obj)->tp_name);
  return THPVariable_Unpack(obj);
}

// `what` names the sequence and `each` its items in errors.
std::vector<at::Tensor> tensors(PyObject* seq, const char* what, const char* each) {
  std::vector<at::Tensor> out;
  for (PyObject* item : sequence_items(seq, what)) out.push_back(as_tensor(item, each));
  return out;
}

c10::List<std::optional<at::Tensor>> optional_tensors(PyObject* seq, const char* what, const char* each) {
  c10::List<std::optional<at::Tensor>> out;
  for (PyObject* item : sequence_items(seq, what)) {
    out.push_back(item == Py_None ? std::nullopt : std::optional<at::Tensor>(as_tensor(item, each)));
  }
  return out;
}

std::vector<int64_t> ints(PyObject* seq, const char* what) {
  std::vector<int64_t> out;
  for (PyObject* item : sequence_items(seq, what)) {
    TORCH_CHECK_TYPE(PyLong_Check(item), "convnet_forward: ", what, " must hold ints, got ", Py_TYPE(item)->tp_name);
    out.push_back(PyLong_AsLongLong(item));
    if (PyErr_Occurred()) throw python_error();
  }
  return out;
}

// _C.convnet_forward(input, conv_weights, conv_biases, conv_params, linear_weights, linear_biases):
// the op lightnet_ops::convnet_forward's kernel called without torch.ops' boxed call, whose
// conversion of the argument lists cost about 7 us, a fifth of LightNet's whole forward at
// batch 1. The layers' ops still go through the dispatcher (autograd, dispatch modes and the
// profiler see them as with torch.ops). No __torch_function__ handling: the caller
// (LightNet._one_call_args) passes plain tensors and parameters only, outside torch function
// modes, tracing and TorchDynamo.
PyObject* convnet_forward_entry(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *input, *conv_weights, *conv_biases, *conv_params, *linear_weights, *linear_biases;
  if (!PyArg_UnpackTuple(args, "convnet_forward", 6, 6, &input, &conv_weights, &conv_biases, &conv_params,
                         &linear_weights, &linear_biases)) {
    return nullptr;
  }
  const at::Tensor& x = as_tensor(input, "input");
  const std::vector<at::Tensor> cw = tensors(conv_weights, "conv_weights", "each conv weight");
  const c10::List<std::optional<at::Tensor>> cb = optional_tensors(conv_biases, "conv_biases", "each conv bias");
  const std::vector<int64_t> cp = ints(conv_params, "conv_params");
  const std::vector<at::Tensor> lw = tensors(linear_weights, "linear_weights", "each linear weight");
  const c10::List<std::optional<at::Tensor>> lb = optional_tensors(linear_biases, "linear_biases", "each linear bias");
  at::Tensor out;
  {
    GilRelease no_gil;
    out = lightnet_ops::convnet_forward(x, cw, cb, cp, lw, lb);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef module_methods[] = {
    {"convnet_forward", convnet_forward_entry, METH_VARARGS,
     "convnet_forward(input, conv_weights, conv_biases, conv_params, linear_weights, linear_biases): "
     "torch.ops.lightnet_ops.convnet_forward without the boxed call (plain tensors only)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// `import lightnet_ops._C` loads this shared library, which runs the registrations of every file.
// The module's one Python function is the fast entry above; everything else is a registered op.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  return PyModule_Create(&module_def);
}
}

// Claims the lightnet_ops namespace (a second library defining it fails to load); the ops' files
// add to it with fragments.
TORCH_LIBRARY(lightnet_ops, m) {}

// The extension's module and its op library. Each op declares its schemas in its own file
// (csrc/<op>.cpp, a TORCH_LIBRARY_FRAGMENT with the same text as its contract,
// lightnet_ops/ops/<op>.py); device kernels register implementations in csrc/cpu/*.cpp and
// csrc/cuda/*.cu; the fakes come from the contracts.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <Python.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <vector>

#include "lightnet_ops/convnet.h"
#include "lightnet_ops/op_handles.h"

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

// ---- The functional ops' direct entries --------------------------------------------------------
// _C.linear_relu and _C.conv2d_relu_maxpool2d are the functional API's first try
// (lightnet_ops/api/<op>.py). They call the op through its typed dispatcher handle, so autograd,
// dispatch modes and the profiler see the same op as through torch.ops; what they skip is torch.ops'
// boxed call and the Python wrapper's argument handling, which together cost more host time than
// one F.conv2d / F.linear call. They take only the plain case and return None for everything else,
// which the Python API then handles (normalising, checking, resolving the backend) as before:
//  - backend "auto" or "cpu", with every tensor a torch.Tensor or nn.Parameter (no subclass that
//    could define __torch_function__) on the CPU, and a float32 / float64 input (what "auto"
//    resolves to the cpu backend for: lightnet_ops/backend_registry.py);
//  - no Python-level dispatch that the Python API does itself (python_level_dispatch());
//  - int parameters given as ints or pairs of ints, the conv's padding not a string, ceil_mode a
//    bool, the conv's input 3-D or 4-D and the linear's input 2-D.
// Bad values in that form (shapes, sizes, dtypes) reach the op, whose C++ checks raise the same
// errors as through torch.ops. TorchDynamo cannot trace these calls: the Python API does not try
// them while compiling.

// Whether something the Python API handles in Python is active: a torch function mode, a
// torch.jit.trace, a torch.func transform or CPU autocast.
bool python_level_dispatch() {
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  return at::impl::torch_function_mode_enabled() || torch::jit::tracer::isTracing() ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode) || at::autocast::is_autocast_enabled(at::kCPU);
}

// The tensor behind a plain CPU tensor or parameter, or nullptr for anything else.
const at::Tensor* plain_cpu_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  return t.is_cpu() ? &t : nullptr;
}

bool float_or_double(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

// backend "auto" or "cpu" (a str).
bool cpu_backend_requested(PyObject* backend) {
  return PyUnicode_CheckExact(backend) && (PyUnicode_CompareWithASCIIString(backend, "auto") == 0 ||
                                           PyUnicode_CompareWithASCIIString(backend, "cpu") == 0);
}

// An int parameter as the op takes it: `k` -> (k, k), a list or tuple of two ints -> itself.
// false for any other form (the Python API normalises those, or raises).
bool int_pair(PyObject* obj, std::array<int64_t, 2>& out) {
  if (PyLong_CheckExact(obj)) {
    out[0] = out[1] = PyLong_AsLongLong(obj);
  } else if ((PyTuple_CheckExact(obj) || PyList_CheckExact(obj)) && PySequence_Fast_GET_SIZE(obj) == 2) {
    PyObject** items = PySequence_Fast_ITEMS(obj);
    if (!PyLong_CheckExact(items[0]) || !PyLong_CheckExact(items[1])) return false;
    out[0] = PyLong_AsLongLong(items[0]);
    out[1] = PyLong_AsLongLong(items[1]);
  } else {
    return false;
  }
  if (PyErr_Occurred()) {  // an int beyond int64: the Python API reports it
    PyErr_Clear();
    return false;
  }
  return true;
}

PyObject* not_taken() { Py_RETURN_NONE; }

// The tensor operands shared by both entries, (input, weight, bias) = args[0..2].
struct Operands {
  const at::Tensor* input = nullptr;
  const at::Tensor* weight = nullptr;
  std::optional<at::Tensor> bias;
};

// Fills `ops` and returns true where the operands and the backend are the plain case: plain CPU
// tensors (bias None or one), a float32 / float64 input, backend "auto" or "cpu", and no
// Python-level dispatch active.
bool plain_operands(PyObject* const* args, PyObject* backend, Operands& ops) {
  ops.input = plain_cpu_tensor(args[0]);
  ops.weight = plain_cpu_tensor(args[1]);
  if (ops.input == nullptr || ops.weight == nullptr || !float_or_double(*ops.input)) return false;
  if (args[2] != Py_None) {
    const at::Tensor* bias = plain_cpu_tensor(args[2]);
    if (bias == nullptr) return false;
    ops.bias = *bias;
  }
  return cpu_backend_requested(backend) && !python_level_dispatch();
}

// _C.linear_relu(input, weight, bias, backend) -> output, or None where the call is not the plain case.
PyObject* linear_relu_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 4, "_C.linear_relu: expected 4 arguments (input, weight, bias, backend), got ", nargs);
  Operands ops;
  if (!plain_operands(args, args[3], ops) || ops.input->dim() != 2 || (ops.bias && ops.bias->dim() == 0)) {
    return not_taken();
  }
  at::Tensor out;
  {
    GilRelease no_gil;
    out = lightnet_ops::linear_relu_op().call(*ops.input, *ops.weight, ops.bias);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// _C.conv2d_relu_maxpool2d(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride,
// pool_padding, ceil_mode, backend) -> output, or None where the call is not the plain case. The
// arguments are the functional API's own (pool_stride None means pool_kernel_size).
PyObject* conv2d_relu_maxpool2d_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 11, "_C.conv2d_relu_maxpool2d: expected 11 arguments, got ", nargs);
  Operands ops;
  if (!plain_operands(args, args[10], ops) || (ops.input->dim() != 3 && ops.input->dim() != 4) ||
      (args[9] != Py_True && args[9] != Py_False)) {
    return not_taken();
  }
  std::array<int64_t, 2> stride, padding, dilation, pool_kernel, pool_stride, pool_padding;
  if (!int_pair(args[3], stride) || !int_pair(args[4], padding) || !int_pair(args[5], dilation) ||
      !int_pair(args[6], pool_kernel) || !int_pair(args[8], pool_padding)) {
    return not_taken();
  }
  if (args[7] == Py_None) {
    pool_stride = pool_kernel;
  } else if (!int_pair(args[7], pool_stride)) {
    return not_taken();
  }
  const bool ceil_mode = args[9] == Py_True;
  const bool unbatched = ops.input->dim() == 3;
  at::Tensor out;
  {
    GilRelease no_gil;
    const at::Tensor x = unbatched ? ops.input->unsqueeze(0) : *ops.input;
    const at::Tensor& w = *ops.weight;
    out = std::get<0>(lightnet_ops::conv_pool_op().call(x, w, ops.bias, stride, padding, dilation, pool_kernel,
                                                         pool_stride, lightnet_ops::needs_grad(x, w, ops.bias),
                                                         pool_padding, ceil_mode));
    if (unbatched) out = out.squeeze(0);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// ---- LightNet's forward ------------------------------------------------------------------------
// _C.lightnet_forward(net, x): LightNet.forward's one call of convnet_forward, with the checks of
// LightNet._one_call_args made here on the modules' own dicts instead of in Python, where they
// cost about 5 us per forward (a fifth of the batch-1 forward). None wherever one does not pass,
// or where a value is not in the form __init__ leaves it (then forward runs _one_call_args, which
// decides for itself). The classes come once from models.py (_C.set_lightnet_classes).
// TorchDynamo cannot trace the call: forward does not try it while compiling.

struct LightNetClasses {
  PyObject* conv = nullptr;         // Conv2dReLUMaxPool2d
  PyObject* linear_relu = nullptr;  // LinearReLU
  PyObject* linear = nullptr;       // nn.Linear
  PyObject* module_state = nullptr;  // the torch.nn.modules.module module (the global hooks)
} lightnet_classes;

// The attribute names the checks read, interned once.
enum Name {
  kModules, kParameters, kForwardPreHooks, kForwardHooks, kBackwardPreHooks, kBackwardHooks, kBackend, kWeight,
  kBias, kStride, kPadding, kDilation, kPoolKernelSize, kPoolStride, kPoolPadding, kCeilMode, kConv1, kConv2,
  kFc1, kFc2, kFc3, kGlobalForwardPreHooks, kGlobalForwardHooks, kGlobalBackwardPreHooks, kGlobalBackwardHooks,
  kNameCount
};

PyObject* name(Name n) {
  static const std::array<PyObject*, kNameCount> names = [] {
    const char* text[kNameCount] = {"_modules", "_parameters", "_forward_pre_hooks", "_forward_hooks",
                                    "_backward_pre_hooks", "_backward_hooks", "backend", "weight", "bias", "stride",
                                    "padding", "dilation", "pool_kernel_size", "pool_stride", "pool_padding",
                                    "ceil_mode", "conv1", "conv2", "fc1", "fc2", "fc3", "_global_forward_pre_hooks",
                                    "_global_forward_hooks", "_global_backward_pre_hooks",
                                    "_global_backward_hooks"};
    std::array<PyObject*, kNameCount> out{};
    for (int i = 0; i < kNameCount; ++i) {
      out[i] = PyUnicode_InternFromString(text[i]);
      TORCH_INTERNAL_ASSERT(out[i] != nullptr, "lightnet_forward: could not intern ", text[i]);
    }
    return out;
  }();
  return names[n];
}

// A module's instance dict, held while this lives; entries are borrowed from it.
class InstanceDict {
 public:
  explicit InstanceDict(PyObject* obj) : dict_(PyObject_GenericGetDict(obj, nullptr)) {
    if (dict_ == nullptr) PyErr_Clear();
  }
  ~InstanceDict() { Py_XDECREF(dict_); }
  InstanceDict(const InstanceDict&) = delete;
  InstanceDict& operator=(const InstanceDict&) = delete;
  // The entry (borrowed), or nullptr.
  PyObject* operator[](Name n) const { return dict_ != nullptr ? PyDict_GetItem(dict_, name(n)) : nullptr; }

 private:
  PyObject* dict_;
};

bool empty_dict(PyObject* obj) { return obj != nullptr && PyDict_Check(obj) && PyDict_GET_SIZE(obj) == 0; }

// A LightNet layer as __init__ made it: exactly `cls`, no hooks; weight and bias plain CPU tensors
// (bias None allowed), appended to the lists.
bool plain_layer(const InstanceDict& d, std::vector<at::Tensor>& weights,
                 c10::List<std::optional<at::Tensor>>& biases) {
  if (!empty_dict(d[kForwardPreHooks]) || !empty_dict(d[kForwardHooks]) || !empty_dict(d[kBackwardPreHooks]) ||
      !empty_dict(d[kBackwardHooks])) {
    return false;
  }
  PyObject* params = d[kParameters];
  if (params == nullptr || !PyDict_Check(params)) return false;
  PyObject* weight = PyDict_GetItem(params, name(kWeight));
  PyObject* bias = PyDict_GetItem(params, name(kBias));
  const at::Tensor* w = weight != nullptr ? plain_cpu_tensor(weight) : nullptr;
  if (w == nullptr || bias == nullptr) return false;
  weights.push_back(*w);
  if (bias == Py_None) {
    biases.push_back(std::nullopt);
    return true;
  }
  const at::Tensor* b = plain_cpu_tensor(bias);
  if (b == nullptr) return false;
  biases.push_back(*b);
  return true;
}

// A fused layer's backend, "auto" or "cpu" with a float32 / float64 input: what
// backend_registry.resolve takes to the cpu backend's kernels (other dtypes: Python resolves them,
// to the reference backend or to its error).
bool fused_backend(const InstanceDict& d, const at::Tensor& x) {
  PyObject* backend = d[kBackend];
  return backend != nullptr && cpu_backend_requested(backend) && float_or_double(x);
}

// A conv layer's 13 convnet_forward parameters (stride, padding, dilation, pool_kernel_size,
// pool_stride, pool_padding as tuples of two ints, ceil_mode a bool), appended to `params`.
bool conv_stage_params(const InstanceDict& d, std::vector<int64_t>& params) {
  for (Name n : {kStride, kPadding, kDilation, kPoolKernelSize, kPoolStride, kPoolPadding}) {
    PyObject* pair = d[n];
    std::array<int64_t, 2> v;
    if (pair == nullptr || !PyTuple_CheckExact(pair) || !int_pair(pair, v)) return false;
    params.insert(params.end(), v.begin(), v.end());
  }
  PyObject* ceil_mode = d[kCeilMode];
  if (ceil_mode != Py_True && ceil_mode != Py_False) return false;
  params.push_back(ceil_mode == Py_True ? 1 : 0);
  return true;
}

// No global module hook (torch.nn.modules.module's four registries).
bool no_global_hooks() {
  for (Name n : {kGlobalForwardPreHooks, kGlobalForwardHooks, kGlobalBackwardPreHooks, kGlobalBackwardHooks}) {
    PyObject* hooks = PyObject_GetAttr(lightnet_classes.module_state, name(n));
    if (hooks == nullptr) {
      PyErr_Clear();
      return false;
    }
    const bool empty = empty_dict(hooks);
    Py_DECREF(hooks);
    if (!empty) return false;
  }
  return true;
}

PyObject* lightnet_forward_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 2, "_C.lightnet_forward: expected 2 arguments (net, x), got ", nargs);
  PyObject* x_obj = args[1];
  if (lightnet_classes.conv == nullptr || Py_TYPE(x_obj) != reinterpret_cast<PyTypeObject*>(THPVariableClass)) {
    return not_taken();
  }
  const at::Tensor& x = THPVariable_Unpack(x_obj);
  // Autocast on any device, as _one_call_args' torch._C._is_any_autocast_enabled().
  if (!x.is_cpu() || x.dim() != 4 || python_level_dispatch() || lightnet_ops::any_autocast_enabled() ||
      !no_global_hooks()) {
    return not_taken();
  }
  const InstanceDict net(args[0]);
  PyObject* modules = net[kModules];
  if (modules == nullptr || !PyDict_Check(modules)) return not_taken();
  std::vector<at::Tensor> conv_weights, linear_weights;
  c10::List<std::optional<at::Tensor>> conv_biases, linear_biases;
  std::vector<int64_t> conv_params;
  const std::array<std::pair<Name, PyObject*>, 5> layers = {
      {{kConv1, lightnet_classes.conv}, {kConv2, lightnet_classes.conv}, {kFc1, lightnet_classes.linear_relu},
       {kFc2, lightnet_classes.linear_relu}, {kFc3, lightnet_classes.linear}}};
  for (const auto& [layer, cls] : layers) {
    PyObject* m = PyDict_GetItem(modules, name(layer));
    if (m == nullptr || reinterpret_cast<PyObject*>(Py_TYPE(m)) != cls) return not_taken();
    const InstanceDict d(m);
    const bool conv = cls == lightnet_classes.conv;
    if (cls != lightnet_classes.linear && !fused_backend(d, x)) return not_taken();
    if (conv ? !plain_layer(d, conv_weights, conv_biases) || !conv_stage_params(d, conv_params)
             : !plain_layer(d, linear_weights, linear_biases)) {
      return not_taken();
    }
  }
  at::Tensor out;
  {
    GilRelease no_gil;
    out = lightnet_ops::convnet_forward(x, conv_weights, conv_biases, conv_params, linear_weights, linear_biases);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// _C.set_lightnet_classes(Conv2dReLUMaxPool2d, LinearReLU, nn.Linear, torch.nn.modules.module): the
// classes and module lightnet_forward checks against (strong references, kept for the process).
PyObject* set_lightnet_classes(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 4, "_C.set_lightnet_classes: expected 4 arguments, got ", nargs);
  for (Py_ssize_t i = 0; i < 4; ++i) Py_INCREF(args[i]);
  const LightNetClasses old = lightnet_classes;
  lightnet_classes = {args[0], args[1], args[2], args[3]};
  for (PyObject* obj : {old.conv, old.linear_relu, old.linear, old.module_state}) Py_XDECREF(obj);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef module_methods[] = {
    {"convnet_forward", convnet_forward_entry, METH_VARARGS,
     "convnet_forward(input, conv_weights, conv_biases, conv_params, linear_weights, linear_biases): "
     "torch.ops.lightnet_ops.convnet_forward without the boxed call (plain tensors only)."},
    {"linear_relu", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(linear_relu_entry)), METH_FASTCALL,
     "linear_relu(input, weight, bias, backend): torch.ops.lightnet_ops.linear_relu without the boxed call, "
     "or None where the call is not the plain case."},
    {"conv2d_relu_maxpool2d",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(conv2d_relu_maxpool2d_entry)), METH_FASTCALL,
     "conv2d_relu_maxpool2d(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, "
     "pool_padding, ceil_mode, backend): the output without torch.ops' boxed call, or None where the call is "
     "not the plain case."},
    {"lightnet_forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(lightnet_forward_entry)),
     METH_FASTCALL,
     "lightnet_forward(net, x): LightNet's forward in one convnet_forward call with _one_call_args' checks made "
     "in C++, or None where one does not pass."},
    {"set_lightnet_classes", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(set_lightnet_classes)),
     METH_FASTCALL, "set_lightnet_classes(conv, linear_relu, linear, module_state): for lightnet_forward."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// `import lightnet_ops._C` loads this shared library, which runs the registrations of every file.
// The module's Python functions are the direct entries above; everything else is a registered op.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  return PyModule_Create(&module_def);
}
}

// Claims the lightnet_ops namespace (a second library defining it fails to load); the ops' files
// add to it with fragments.
TORCH_LIBRARY(lightnet_ops, m) {}

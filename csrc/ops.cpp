// The extension's op schemas. Each op's contract (lightnet_ops/ops/<op>.py) holds the same schema
// text, which the Triton backend registers too; tests/test_contracts.py checks they agree. Device
// kernels register implementations in csrc/cpu/*.cpp and csrc/cuda/*.cu; the fakes come from the
// contracts.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import lightnet_ops._C` loads this shared library, which runs the registrations below.
// The module itself has no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lightnet_ops, m) {
  // Returns (output (N, K, PH, PW), argmax). argmax is uint8 (N, K, PH, PW): the offset of the
  // selected element inside its pool window (row-major), or 255 where ReLU zeroed the output.
  // It is an empty uint8 tensor when need_argmax is false (inference).
  m.def(
      "conv2d_relu_maxpool2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int[2] pool_kernel_size, int[2] pool_stride, bool need_argmax, int[2] pool_padding=[0, 0], "
      "bool ceil_mode=False) -> (Tensor, Tensor)");
  // Returns (grad_input, grad_weight, grad_bias); an entry whose output_mask is false (or
  // grad_bias without a bias) is an empty tensor of shape [0].
  m.def(
      "conv2d_relu_maxpool2d_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor argmax, "
      "int[2] stride, int[2] padding, int[2] dilation, int[2] pool_kernel_size, int[2] pool_stride, "
      "bool[3] output_mask, int[2] pool_padding=[0, 0], bool ceil_mode=False) -> (Tensor, Tensor, Tensor)");
  // input (M, in_features) -> output (M, out_features).
  m.def("linear_relu(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  // `output` is the forward's output: it carries the ReLU gate. Same return convention as above.
  m.def(
      "linear_relu_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor output, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
}

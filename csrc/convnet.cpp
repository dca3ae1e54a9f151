// convnet_forward: a stack of conv2d_relu_maxpool2d stages, a flatten and linear stages (linear_relu,
// then a plain linear) in one call, as lo.LightNet's forward runs them. It calls the registered ops
// through the dispatcher (a CompositeImplicitAutograd kernel), so autograd, tangents, dispatch modes
// and the profiler see the ops the module-by-module forward calls (the last, plain linear stage as
// lightnet_ops::_linear_no_grad, which is aten::linear wherever autograd records it); what it
// removes is the Python between the layers (module calls, argument handling, one boxed call per
// layer), which is most of a small batch's time on the CPU.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "lightnet_ops/convnet.h"
#include "lightnet_ops/op_handles.h"

TORCH_LIBRARY_FRAGMENT(lightnet_ops, m) {
  // conv_params: 13 ints per conv stage: stride, padding, dilation, pool_kernel_size, pool_stride,
  // pool_padding (pairs) and ceil_mode (0/1). Every linear stage but the last is linear_relu.
  m.def(
      "convnet_forward(Tensor input, Tensor[] conv_weights, Tensor?[] conv_biases, int[] conv_params, "
      "Tensor[] linear_weights, Tensor?[] linear_biases) -> Tensor");
}

namespace lightnet_ops {
namespace {

constexpr int64_t kConvParams = 13;

}  // namespace

at::Tensor convnet_forward(const at::Tensor& input, at::TensorList conv_weights,
                           const c10::List<std::optional<at::Tensor>>& conv_biases, at::IntArrayRef conv_params,
                           at::TensorList linear_weights, const c10::List<std::optional<at::Tensor>>& linear_biases) {
  const auto& conv_pool = conv_pool_op();
  const auto& linear_relu = linear_relu_op();
  const int64_t convs = static_cast<int64_t>(conv_weights.size());
  const int64_t linears = static_cast<int64_t>(linear_weights.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(conv_biases.size()) == convs && conv_params.size() == size_t(convs * kConvParams),
                    "convnet_forward: expected one bias and ", kConvParams, " parameters per conv stage");
  TORCH_CHECK_VALUE(static_cast<int64_t>(linear_biases.size()) == linears && linears >= 1,
                    "convnet_forward: expected at least one linear stage and one bias per linear stage");
  TORCH_CHECK_VALUE(input.dim() == 4, "convnet_forward: expected 4-D (N, C, H, W) input, got ", input.dim(), "-D");
  at::Tensor x = input;
  for (int64_t i = 0; i < convs; ++i) {
    const int64_t* p = conv_params.data() + i * kConvParams;
    const std::optional<at::Tensor> bias = conv_biases.get(i);
    x = std::get<0>(conv_pool.call(x, conv_weights[i], bias, {p[0], p[1]}, {p[2], p[3]}, {p[4], p[5]}, {p[6], p[7]},
                                   {p[8], p[9]}, needs_grad(x, conv_weights[i], bias), {p[10], p[11]}, p[12] != 0));
  }
  x = x.flatten(1);
  for (int64_t i = 0; i + 1 < linears; ++i) x = linear_relu.call(x, linear_weights[i], linear_biases.get(i));
  // The last stage is a plain linear: _linear_no_grad, which is at::linear wherever a gradient or
  // tangent is recorded and otherwise runs the project's CPU GEMMs (stock's BLAS took 7 us for
  // LightNet's 8 x 84 -> 10 on an EPYC).
  return linear_no_grad_op().call(x, linear_weights[linears - 1], linear_biases.get(linears - 1));
}

}  // namespace lightnet_ops

TORCH_LIBRARY_IMPL(lightnet_ops, CompositeImplicitAutograd, m) {
  m.impl("convnet_forward", &lightnet_ops::convnet_forward);
}

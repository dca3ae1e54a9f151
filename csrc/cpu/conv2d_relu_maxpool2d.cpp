// CPU conv2d_relu_maxpool2d (float32, float64): the ops' entry points. Each call checks its
// arguments (conv2d_relu_maxpool2d.h), asks the planning unit for a plan (csrc/cpu/conv_plan.cpp),
// runs that plan's path (csrc/cpu/conv_*.cpp, declared in cpu_conv_paths.h) and records what ran.
//
// Forward paths: direct (few input channels, e.g. LightNet: no conv output materialised) and its
// Winograd variant; ATen (many channels, e.g. VGG blocks: oneDNN convolution in batch chunks plus
// one fused bias / pool / ReLU / argmax pass) and its Winograd variant. Backward paths: direct,
// scatter (from the live pooled elements only) and dense (ATen's convolution_backward).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "lightnet_ops/conv2d_relu_maxpool2d.h"
#include "lightnet_ops/cpu_conv_paths.h"
#include "lightnet_ops/cpu_conv_plan.h"

namespace lightnet_ops {
namespace {

using cpu::ConvBackward;
using cpu::ConvForward;

std::tuple<at::Tensor, at::Tensor> conv2d_relu_maxpool2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& bias,
                                                             at::IntArrayRef stride, at::IntArrayRef padding,
                                                             at::IntArrayRef dilation, at::IntArrayRef pool_kernel_size,
                                                             at::IntArrayRef pool_stride, bool need_argmax) {
  constexpr const char* op = "conv2d_relu_maxpool2d";
  const ConvPoolShape s =
      check_conv2d_relu_maxpool2d(op, input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride);
  check_backend_dtype(op, input, "cpu", {at::kFloat, at::kDouble}, "float32 and float64");
  auto out = at::empty({s.N, s.K, s.PH, s.PW}, input.options());
  auto argmax = need_argmax ? at::empty({s.N, s.K, s.PH, s.PW}, input.options().dtype(at::kByte))
                            : at::empty({0}, input.options().dtype(at::kByte));
  if (out.numel() == 0) {
    cpu::record(cpu::ConvForwardRun{});
    return {out, argmax};
  }
  const at::Tensor b = checks::has(bias) ? bias->contiguous() : at::Tensor();
  const cpu::ConvForwardPlan plan = cpu::plan_forward(s, input, weight);
  cpu::ConvForwardRun run{plan, plan.path, 0};
  switch (plan.path) {
    case ConvForward::kDirect:
    case ConvForward::kDirectWinograd:
      run = cpu::run_direct_forward(s, plan, input.contiguous(), weight.contiguous(), b, out, argmax, need_argmax);
      break;
    case ConvForward::kAtenWinograd:
      if (cpu::run_aten_winograd_forward(s, plan, input, weight, b, out, argmax, need_argmax)) break;
      run.ran = ConvForward::kAtenConv;  // a non-finite value: recompute everything by convolution
      [[fallthrough]];
    case ConvForward::kAtenConv:
      cpu::run_aten_conv_forward(s, plan, input, weight, b, stride, padding, dilation, out, argmax, need_argmax);
      break;
    case ConvForward::kNone:
      break;
  }
  cpu::record(run);
  return {out, argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_maxpool2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& argmax,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef pool_kernel_size,
    at::IntArrayRef pool_stride, std::array<bool, 3> output_mask) {
  constexpr const char* op = "conv2d_relu_maxpool2d_backward";
  const ConvPoolShape s = check_conv2d_relu_maxpool2d_backward(op, grad_output, input, weight, argmax, stride, padding,
                                                               dilation, pool_kernel_size, pool_stride);
  check_backend_dtype(op, input, "cpu", {at::kFloat, at::kDouble}, "float32 and float64");
  const cpu::ConvBackwardPlan plan = cpu::plan_backward(s, &grad_output, input, weight, output_mask);
  cpu::ConvBackwardRun run{plan, plan.input_grad, 0};
  cpu::ConvGrads grads;
  switch (plan.path) {
    case ConvBackward::kDirect:
      grads = cpu::run_direct_backward(s, plan, grad_output, input, weight, argmax, output_mask, run);
      break;
    case ConvBackward::kScatter:
      grads = cpu::run_scatter_backward(s, plan, grad_output, input, weight, argmax, output_mask);
      break;
    case ConvBackward::kDense:
      grads = cpu::run_dense_backward(s, grad_output, input, weight, argmax, stride, padding, dilation, output_mask);
      break;
  }
  cpu::record(run);
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(lightnet_ops, CPU, m) {
  m.impl("conv2d_relu_maxpool2d", &composite::conv_forward_op<&conv2d_relu_maxpool2d_cpu>);
  m.impl("conv2d_relu_maxpool2d_backward", &composite::conv_backward_op<&conv2d_relu_maxpool2d_backward_cpu>);
}

}  // namespace lightnet_ops

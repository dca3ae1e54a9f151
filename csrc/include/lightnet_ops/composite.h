// The fused ops written as compositions of ATen ops (device-independent: CPU and CUDA alike).
//
// The same arithmetic as each op's Python reference (lightnet_ops/ops/<op>.py). Used where no
// hand-written kernel applies (pool padding, ceil mode) and, being made of differentiable ATen
// ops, for double backward and forward-mode AD (csrc/autograd.cpp): with the routing (argmax,
// ReLU gate) fixed the ops are piecewise linear, so autograd through these ATen ops is exact.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <tuple>

namespace lightnet_ops::composite {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // (grad_input, grad_weight, grad_bias)

// The pool parameters of one conv problem: window, stride, padding (as -inf), ceil mode.
struct Pool {
  at::IntArrayRef kernel, stride, padding;
  bool ceil_mode;
};

// Whether a problem needs the composite path: the kernels implement floor-mode unpadded pools only.
inline bool pool_needs_composite(at::IntArrayRef pool_padding, bool ceil_mode) {
  return ceil_mode || pool_padding[0] != 0 || pool_padding[1] != 0;
}

// conv2d_relu_maxpool2d's forward: (output (N, K, PH, PW), argmax uint8 (N, K, PH, PW) or empty).
std::tuple<at::Tensor, at::Tensor> conv_forward(const at::Tensor& input, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation, const Pool& pool,
                                                bool need_argmax);

// conv2d_relu_maxpool2d's backward (differentiable in grad_output, input and weight); entries whose
// mask is false are undefined.
Grads conv_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                    const at::Tensor& argmax, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, const Pool& pool, std::array<bool, 3> mask);

// Tangent of the conv op's output: route(conv(t_input, w) + conv(x, t_weight) + t_bias) through the
// argmax; undefined tangents count as zero.
at::Tensor conv_tangent(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& t_input,
                        const at::Tensor& t_weight, const at::Tensor& t_bias, const at::Tensor& argmax,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, const Pool& pool);

// linear_relu's backward (differentiable); `output` is the forward's output (the ReLU gate).
Grads linear_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                      const at::Tensor& output, std::array<bool, 3> mask);

// Tangent of linear_relu's output, gated by the ReLU.
at::Tensor linear_tangent(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& t_input,
                          const at::Tensor& t_weight, const at::Tensor& t_bias, const at::Tensor& output);

// ---- Device kernels with the pool options -----------------------------------------------------
// The hand-written kernels take floor-mode, unpadded pools; these adapters give them the schema's
// full argument list and send the other pools to the composition above. Register them as
// `m.impl("conv2d_relu_maxpool2d", &composite::conv_forward_op<&my_kernel>)`.

void check_pool_padding(at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_padding);

at::Tensor empty_if_undefined(const at::Tensor& grad, const at::Tensor& like);

template <auto Kernel>  // (input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, need_argmax)
std::tuple<at::Tensor, at::Tensor> conv_forward_op(const at::Tensor& input, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                                   at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
                                                   bool need_argmax, at::IntArrayRef pool_padding, bool ceil_mode) {
  if (!pool_needs_composite(pool_padding, ceil_mode)) {
    return Kernel(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, need_argmax);
  }
  check_pool_padding(pool_kernel_size, pool_padding);
  return conv_forward(input, weight, bias, stride, padding, dilation,
                      Pool{pool_kernel_size, pool_stride, pool_padding, ceil_mode}, need_argmax);
}

template <auto Kernel>  // (grad_output, input, weight, argmax, stride, padding, dilation, pool_kernel_size,
                        //  pool_stride, output_mask)
Grads conv_backward_op(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                       const at::Tensor& argmax, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
                       std::array<bool, 3> output_mask, at::IntArrayRef pool_padding, bool ceil_mode) {
  if (!pool_needs_composite(pool_padding, ceil_mode)) {
    return Kernel(grad_output, input, weight, argmax, stride, padding, dilation, pool_kernel_size, pool_stride,
                  output_mask);
  }
  check_pool_padding(pool_kernel_size, pool_padding);
  TORCH_CHECK_VALUE(argmax.scalar_type() == at::kByte && argmax.sizes() == grad_output.sizes(),
                    "conv2d_relu_maxpool2d_backward: argmax must be uint8 of shape ", grad_output.sizes(), ", got ",
                    argmax.scalar_type(), " ", argmax.sizes(), " (was the forward run with need_argmax=True?)");
  auto [gi, gw, gb] = conv_backward(grad_output, input, weight, argmax, stride, padding, dilation,
                                    Pool{pool_kernel_size, pool_stride, pool_padding, ceil_mode}, output_mask);
  return {empty_if_undefined(gi, input), empty_if_undefined(gw, input), empty_if_undefined(gb, input)};
}

}  // namespace lightnet_ops::composite

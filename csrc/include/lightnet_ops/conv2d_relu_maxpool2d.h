// conv2d_relu_maxpool2d's declarations for its device kernels (csrc/cpu/*, csrc/cuda/*): the
// argument checkers, the ATen composition and the adapters that give the kernels the schema's pool
// options. Defined in csrc/conv2d_relu_maxpool2d.cpp, which also holds the op's schemas and autograd.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <tuple>

#include "lightnet_ops/checks.h"
#include "lightnet_ops/composite.h"

namespace lightnet_ops {

// Validates conv2d_relu_maxpool2d's arguments and returns the problem's sizes: input (N, C, H, W),
// weight (K, C, R, S), bias (K) or none, every int list of 2 elements. `op` prefixes the messages
// (the forward's name, or the backward's).
ConvPoolShape check_conv2d_relu_maxpool2d(const char* op, const at::Tensor& input, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                          at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride);

// Validates conv2d_relu_maxpool2d_backward's arguments: those of the forward (no bias), then
// grad_output (N, K, PH, PW) and the forward's argmax (uint8, same shape).
ConvPoolShape check_conv2d_relu_maxpool2d_backward(const char* op, const at::Tensor& grad_output,
                                                   const at::Tensor& input, const at::Tensor& weight,
                                                   const at::Tensor& argmax, at::IntArrayRef stride,
                                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                                   at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride);

namespace composite {

// The forward as ATen ops: (output (N, K, PH, PW), argmax uint8 (N, K, PH, PW) or empty).
std::tuple<at::Tensor, at::Tensor> conv_forward(const at::Tensor& input, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation, const Pool& pool,
                                                bool need_argmax);

// The backward as ATen ops (differentiable in grad_output, input and weight); entries whose mask is
// false are undefined.
Grads conv_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                    const at::Tensor& argmax, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, const Pool& pool, std::array<bool, 3> mask);

// ---- Device kernels with the pool options -----------------------------------------------------
// The hand-written kernels take floor-mode, unpadded pools; these adapters give them the schema's
// full argument list and send the other pools to the composition above. Register them as
// `m.impl("conv2d_relu_maxpool2d", &composite::conv_forward_op<&my_kernel>)`.

void check_pool_padding(at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_padding);

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

}  // namespace composite

}  // namespace lightnet_ops

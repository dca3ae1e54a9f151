// linear_relu's declarations for its device kernels (csrc/cpu/linear_relu.cpp,
// csrc/cuda/linear_relu.cu): the argument checkers. Defined in csrc/linear_relu.cpp, which also
// holds the op's schemas, its ATen composition and its autograd.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "lightnet_ops/checks.h"

namespace lightnet_ops {

// Validates linear_relu's arguments: input (M, in_features) (the Python API flattens leading
// dimensions), weight (out_features, in_features), bias (out_features) or none.
void check_linear_relu(const char* op, const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias);

// Validates linear_relu_backward's arguments: those of the forward (no bias), then grad_output
// and the forward's output (the ReLU gate), both (M, out_features).
void check_linear_relu_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                const at::Tensor& weight, const at::Tensor& output);

}  // namespace lightnet_ops

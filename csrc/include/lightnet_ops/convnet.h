// convnet_forward (csrc/convnet.cpp): the registered op's kernel, which the extension module's
// Python entry (csrc/ops.cpp) also calls directly.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>

namespace lightnet_ops {

at::Tensor convnet_forward(const at::Tensor& input, at::TensorList conv_weights,
                           const c10::List<std::optional<at::Tensor>>& conv_biases, at::IntArrayRef conv_params,
                           at::TensorList linear_weights, const c10::List<std::optional<at::Tensor>>& linear_biases);

}  // namespace lightnet_ops

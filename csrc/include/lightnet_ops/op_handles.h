// Typed dispatcher handles of the fused forward ops, for C++ callers that call them as torch.ops
// does (through the dispatcher: autograd, dispatch modes and the profiler see the op) but without
// the boxed Python call: convnet_forward (csrc/convnet.cpp) and the extension module's direct
// entries (csrc/ops.cpp). Each handle is looked up once.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>
#include <tuple>

namespace lightnet_ops {

// conv2d_relu_maxpool2d(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride,
// need_argmax, pool_padding, ceil_mode) -> (output, argmax)
using ConvPoolSignature = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::IntArrayRef, c10::IntArrayRef,
    c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, bool, c10::IntArrayRef, bool);
// linear_relu(input, weight, bias) -> output
using LinearReLUSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);

inline const c10::TypedOperatorHandle<ConvPoolSignature>& conv_pool_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lightnet_ops::conv2d_relu_maxpool2d", "")
                             .typed<ConvPoolSignature>();
  return op;
}

inline const c10::TypedOperatorHandle<LinearReLUSignature>& linear_relu_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lightnet_ops::linear_relu", "").typed<LinearReLUSignature>();
  return op;
}

// _linear_no_grad(input, weight, bias) -> output: F.linear, through the project's CPU GEMMs where no
// gradient or tangent is recorded.
inline const c10::TypedOperatorHandle<LinearReLUSignature>& linear_no_grad_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lightnet_ops::_linear_no_grad", "").typed<LinearReLUSignature>();
  return op;
}

// Whether backward may follow the call (grad mode on and some input requiring grad): the conv's
// need_argmax, as the Python API computes it.
inline bool needs_grad(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return at::GradMode::is_enabled() &&
         (input.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad()));
}

// A forward-mode tangent at the default level (torch.autograd.forward_ad.dual_level).
inline bool has_tangent(const at::Tensor& t) { return t._fw_grad(/*level=*/0).defined(); }

// Whether a call must record autograd: backward may follow, or some input carries a tangent.
inline bool records_autograd(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return needs_grad(input, weight, bias) || has_tangent(input) || has_tangent(weight) ||
         (bias.has_value() && bias->defined() && has_tangent(*bias));
}

// Whether autocast is on for any device: an autocast key dropped from the thread's excluded keys
// (torch._C._is_any_autocast_enabled()).
inline bool any_autocast_enabled() {
  const c10::DispatchKeySet excluded = c10::impl::tls_local_dispatch_key_set().excluded_;
  return (excluded & c10::default_excluded_set) != c10::default_excluded_set;
}

}  // namespace lightnet_ops

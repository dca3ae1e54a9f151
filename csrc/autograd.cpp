// Autograd for the extension's forward ops (device-independent: CPU and CUDA kernels alike).
//
// Each forward op gets an Autograd-key kernel: a C++ torch::autograd::Function whose forward
// calls the device kernel below autograd and saves what the hand-written backward op needs, and
// whose backward calls that op (conv2d_relu_maxpool2d_backward / linear_relu_backward). Calling
// torch.ops.lightnet_ops.<op> on tensors that require grad therefore records one graph node, and
// backward runs without entering Python: the Python autograd.Functions in
// lightnet_ops/autograd.py cost about 10-20 us more per fused layer (forward and backward), as much
// as a small layer's kernels. The Python Functions remain for the Triton and reference backends.
//
// Under create_graph=True the backward switches to a differentiable ATen formulation routed by
// the same argmax, so second derivatives are exact; dual (forward-mode AD) inputs get their
// tangent the same way. Plain first-order backward always runs the fast hand-written op.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include "lightnet_ops/composite.h"

#include <array>
#include <tuple>

namespace lightnet_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using composite::Grads;
using composite::Pool;

// The schemas' ops (csrc/ops.cpp), looked up once, called through the dispatcher.
const auto& conv_forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lightnet_ops::conv2d_relu_maxpool2d", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                                     at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool,
                                                     at::IntArrayRef, bool)>();
  return op;
}

const auto& conv_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lightnet_ops::conv2d_relu_maxpool2d_backward", "")
                             .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                          at::IntArrayRef, std::array<bool, 3>, at::IntArrayRef, bool)>();
  return op;
}

const auto& linear_forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lightnet_ops::linear_relu", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  return op;
}

const auto& linear_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lightnet_ops::linear_relu_backward", "")
                             .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          std::array<bool, 3>)>();
  return op;
}

bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Which of (input, weight, bias) backward must compute. Graph edges exist only for the tensors
// that were passed (no bias, no edge), in argument order.
std::array<bool, 3> needed_grads(AutogradContext* ctx, bool has_bias) {
  return {ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_bias && ctx->needs_input_grad(2)};
}

at::Tensor if_needed(const at::Tensor& grad, bool needed) { return needed ? grad : at::Tensor(); }

bool any_requires_grad(const variable_list& vars) {
  for (const auto& v : vars) {
    if (v.defined() && v.requires_grad()) return true;
  }
  return false;
}

// Backward under create_graph=True whose results depend on something that requires grad: it
// must record its own graph (the differentiable formulation below) for a second derivative.
bool creates_graph(const variable_list& backward_inputs) {
  return at::GradMode::is_enabled() && any_requires_grad(backward_inputs);
}

// The forward gradient (tangent) of t at forward-AD level 0, or undefined.
at::Tensor tangent(const at::Tensor& t) { return t.defined() ? t._fw_grad(/*level=*/0) : at::Tensor(); }
at::Tensor tangent(const std::optional<at::Tensor>& t) { return t.has_value() ? tangent(*t) : at::Tensor(); }

// t without its tangent (a differentiable view), or t itself when it has none.
at::Tensor primal(const at::Tensor& t) { return tangent(t).defined() ? t._fw_primal(0) : t; }
std::optional<at::Tensor> primal(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(primal(*t)) : std::nullopt;
}

bool has_tangent(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return tangent(input).defined() || tangent(weight).defined() || tangent(bias).defined();
}

class Conv2dReLUMaxPool2dFunction : public torch::autograd::Function<Conv2dReLUMaxPool2dFunction> {
 public:
  // Returns {output, argmax}; argmax is not differentiable.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef pool_kernel_size,
                               at::IntArrayRef pool_stride, at::IntArrayRef pool_padding, bool ceil_mode) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, argmax] = conv_forward_op().call(input, weight, bias, stride, padding, dilation, pool_kernel_size,
                                                pool_stride, true, pool_padding, ceil_mode);
    ctx->save_for_backward({input, weight, argmax});
    // The six int[2] parameters, flattened.
    std::vector<int64_t> params;
    for (const at::IntArrayRef v : {stride, padding, dilation, pool_kernel_size, pool_stride, pool_padding}) {
      params.insert(params.end(), v.begin(), v.end());
    }
    ctx->saved_data["params"] = params;
    ctx->saved_data["ceil_mode"] = ceil_mode;
    ctx->saved_data["has_bias"] = defined(bias);
    ctx->mark_non_differentiable({argmax});
    // The argmax never gets a gradient; materialising one for backward would allocate and
    // zero-fill an argmax-sized tensor per call (a fill kernel launch on CUDA).
    ctx->set_materialize_grads(false);
    return {out, argmax};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::vector<int64_t> params = ctx->saved_data["params"].toIntVector();
    const auto p = [&](size_t i) { return at::IntArrayRef(params).slice(2 * i, 2); };
    const auto mask = needed_grads(ctx, ctx->saved_data["has_bias"].toBool());
    at::Tensor grad_input, grad_weight, grad_bias;
    // Without materialised gradients, an output that received none arrives undefined: then no
    // gradient flows to any input (undefined results mean zero to autograd).
    const bool ceil_mode = ctx->saved_data["ceil_mode"].toBool();
    if (grads[0].defined() && (mask[0] || mask[1] || mask[2])) {
      if (creates_graph({grads[0], saved[0], saved[1]})) {
        std::tie(grad_input, grad_weight, grad_bias) = composite::conv_backward(
            grads[0], saved[0], saved[1], saved[2], p(0), p(1), p(2), Pool{p(3), p(4), p(5), ceil_mode}, mask);
      } else {
        const at::NoGradGuard no_grad;
        std::tie(grad_input, grad_weight, grad_bias) = conv_backward_op().call(
            grads[0], saved[0], saved[1], saved[2], p(0), p(1), p(2), p(3), p(4), mask, p(5), ceil_mode);
      }
    }
    variable_list out = {if_needed(grad_input, mask[0]), if_needed(grad_weight, mask[1]),
                         if_needed(grad_bias, mask[2])};
    out.resize(10);  // one entry per forward argument (undefined for the non-tensor ones)
    return out;
  }
};

class LinearReLUFunction : public torch::autograd::Function<LinearReLUFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor out = linear_forward_op().call(input, weight, bias);
    ctx->save_for_backward({input, weight, out});  // the output carries the ReLU gate
    ctx->saved_data["has_bias"] = defined(bias);
    ctx->set_materialize_grads(false);  // as for the conv: no zero tensor for a missing gradient
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto mask = needed_grads(ctx, ctx->saved_data["has_bias"].toBool());
    at::Tensor grad_input, grad_weight, grad_bias;
    if (grads[0].defined() && (mask[0] || mask[1] || mask[2])) {
      if (creates_graph({grads[0], saved[0], saved[1]})) {
        std::tie(grad_input, grad_weight, grad_bias) =
            composite::linear_backward(grads[0], saved[0], saved[1], saved[2], mask);
      } else {
        const at::NoGradGuard no_grad;
        std::tie(grad_input, grad_weight, grad_bias) =
            linear_backward_op().call(grads[0], saved[0], saved[1], saved[2], mask);
      }
    }
    return {if_needed(grad_input, mask[0]), if_needed(grad_weight, mask[1]), if_needed(grad_bias, mask[2])};
  }
};

// Whether this call must record a graph node.
bool records_graph(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return at::GradMode::is_enabled() &&
         (input.requires_grad() || weight.requires_grad() || (defined(bias) && bias->requires_grad()));
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_maxpool2d_autograd(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
    bool need_argmax, at::IntArrayRef pool_padding, bool ceil_mode) {
  const bool records = records_graph(input, weight, bias);
  const bool dual = has_tangent(input, weight, bias);
  if (!records && !dual) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return conv_forward_op().call(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride,
                                  need_argmax, pool_padding, ceil_mode);
  }
  // need_argmax=False with an input that requires grad (a graph traced or exported under no_grad,
  // then run with grad): the node still gets its argmax; the caller just does not see it.
  at::Tensor out, argmax;
  if (records) {
    // C++ custom Functions reject dual inputs; their primals carry the reverse-mode history.
    auto outs = Conv2dReLUMaxPool2dFunction::apply(primal(input), primal(weight), primal(bias), stride, padding,
                                                   dilation, pool_kernel_size, pool_stride, pool_padding, ceil_mode);
    out = outs[0];
    argmax = outs[1];
  } else {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(out, argmax) = conv_forward_op().call(input, weight, bias, stride, padding, dilation, pool_kernel_size,
                                                   pool_stride, true, pool_padding, ceil_mode);
  }
  if (dual) {  // forward-mode AD: the tangent routed through the same argmax
    out._set_fw_grad(composite::conv_tangent(primal(input), primal(weight), tangent(input), tangent(weight),
                                             tangent(bias), argmax, stride, padding, dilation,
                                             Pool{pool_kernel_size, pool_stride, pool_padding, ceil_mode}),
                     /*level=*/0, /*is_inplace_op=*/false);
  }
  return {out, need_argmax ? argmax : at::empty({0}, argmax.options())};
}

at::Tensor linear_relu_autograd(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  const bool dual = has_tangent(input, weight, bias);
  at::Tensor out;
  if (records_graph(input, weight, bias)) {
    out = LinearReLUFunction::apply(primal(input), primal(weight), primal(bias));  // see the conv
  } else {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = linear_forward_op().call(input, weight, bias);
  }
  if (dual) {
    out._set_fw_grad(composite::linear_tangent(primal(input), primal(weight), tangent(input), tangent(weight),
                                               tangent(bias), out),
                     /*level=*/0, /*is_inplace_op=*/false);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lightnet_ops, Autograd, m) {
  m.impl("conv2d_relu_maxpool2d", &conv2d_relu_maxpool2d_autograd);
  m.impl("linear_relu", &linear_relu_autograd);
}

}  // namespace lightnet_ops

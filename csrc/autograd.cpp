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
// The backward is not itself differentiable yet: under create_graph=True its results carry a node
// that raises if a second backward reaches it (first_order_only), and dual (forward-mode AD)
// inputs raise.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <array>
#include <tuple>

namespace lightnet_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The schemas' ops (csrc/ops.cpp), looked up once, called through the dispatcher.
const auto& conv_forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lightnet_ops::conv2d_relu_maxpool2d", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                                     at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool)>();
  return op;
}

const auto& conv_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lightnet_ops::conv2d_relu_maxpool2d_backward", "")
                             .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                          at::IntArrayRef, std::array<bool, 3>)>();
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

// The backward ops are not differentiable yet. When backward runs with create_graph=True and any
// of its inputs (grad_output, input, weight) requires grad, the results pass through a node whose
// edges lead to those inputs and whose backward raises, so that differentiating them again along
// ANY path raises. (Python's
// @once_differentiable links its error node to the results' detached copies instead, so a second
// derivative taken with respect to the weight never reaches it and silently drops a term.)
class SecondOrderUnsupported : public torch::autograd::Function<SecondOrderUnsupported> {
 public:
  // Returns copies of the first n_grads tensors; the rest are there only to become graph edges.
  static variable_list forward(AutogradContext* ctx, std::string message, int64_t n_grads, at::TensorList tensors) {
    ctx->saved_data["message"] = message;
    variable_list out;
    for (int64_t i = 0; i < n_grads; ++i) out.push_back(tensors[i].clone());
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, ctx->saved_data["message"].toStringRef());
    return {};
  }
};

variable_list first_order_only(const char* op, const variable_list& inputs, variable_list results) {
  if (!at::GradMode::is_enabled() || !any_requires_grad(inputs)) return results;
  variable_list tensors;
  for (const auto& r : results) {
    if (r.defined()) tensors.push_back(r);
  }
  const auto n_grads = static_cast<int64_t>(tensors.size());
  for (const auto& t : inputs) {
    if (t.defined()) tensors.push_back(t);
  }
  variable_list linked = SecondOrderUnsupported::apply(
      std::string("lightnet_ops.") + op +
          ": second derivatives (double backward through create_graph=True) are not supported yet; use the "
          "stock torch.nn.functional ops for higher-order gradients",
      n_grads, at::TensorList(tensors));
  size_t j = 0;
  for (auto& r : results) {
    if (r.defined()) r = linked[j++];
  }
  return results;
}

// Forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) has no rule for these ops yet: a
// dual input must raise instead of yielding an output without a tangent (read as zero).
void check_no_forward_grad(const char* op, std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK_NOT_IMPLEMENTED(!(t != nullptr && t->defined() && t->_fw_grad(/*level=*/0).defined()), "lightnet_ops.", op,
                                ": forward-mode AD (torch.func.jvp / torch.autograd.forward_ad) is not supported "
                                "yet; use the stock torch.nn.functional ops");
  }
}

class Conv2dReLUMaxPool2dFunction : public torch::autograd::Function<Conv2dReLUMaxPool2dFunction> {
 public:
  // Returns {output, argmax}; argmax is not differentiable.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef pool_kernel_size,
                               at::IntArrayRef pool_stride) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, argmax] =
        conv_forward_op().call(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, true);
    ctx->save_for_backward({input, weight, argmax});
    // The five int[2] parameters, flattened.
    std::vector<int64_t> params;
    for (const at::IntArrayRef v : {stride, padding, dilation, pool_kernel_size, pool_stride}) {
      params.insert(params.end(), v.begin(), v.end());
    }
    ctx->saved_data["params"] = params;
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
    if (grads[0].defined() && (mask[0] || mask[1] || mask[2])) {
      const at::NoGradGuard no_grad;
      std::tie(grad_input, grad_weight, grad_bias) =
          conv_backward_op().call(grads[0], saved[0], saved[1], saved[2], p(0), p(1), p(2), p(3), p(4), mask);
    }
    variable_list out = first_order_only(
        "conv2d_relu_maxpool2d", {grads[0], saved[0], saved[1]},
        {if_needed(grad_input, mask[0]), if_needed(grad_weight, mask[1]), if_needed(grad_bias, mask[2])});
    out.resize(8);  // one entry per forward argument (undefined for the non-tensor ones)
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
      const at::NoGradGuard no_grad;
      std::tie(grad_input, grad_weight, grad_bias) =
          linear_backward_op().call(grads[0], saved[0], saved[1], saved[2], mask);
    }
    return first_order_only(
        "linear_relu", {grads[0], saved[0], saved[1]},
        {if_needed(grad_input, mask[0]), if_needed(grad_weight, mask[1]), if_needed(grad_bias, mask[2])});
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
    bool need_argmax) {
  check_no_forward_grad("conv2d_relu_maxpool2d", {&input, &weight, bias ? &*bias : nullptr});
  if (!records_graph(input, weight, bias)) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return conv_forward_op().call(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride,
                                  need_argmax);
  }
  TORCH_CHECK(need_argmax,
              "conv2d_relu_maxpool2d: need_argmax=False keeps no argmax, so there is no backward; call it with "
              "need_argmax=True when an input requires grad (or under torch.no_grad())");
  auto outs = Conv2dReLUMaxPool2dFunction::apply(input, weight, bias, stride, padding, dilation, pool_kernel_size,
                                                 pool_stride);
  return {outs[0], outs[1]};
}

at::Tensor linear_relu_autograd(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  check_no_forward_grad("linear_relu", {&input, &weight, bias ? &*bias : nullptr});
  if (!records_graph(input, weight, bias)) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return linear_forward_op().call(input, weight, bias);
  }
  return LinearReLUFunction::apply(input, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(lightnet_ops, Autograd, m) {
  m.impl("conv2d_relu_maxpool2d", &conv2d_relu_maxpool2d_autograd);
  m.impl("linear_relu", &linear_relu_autograd);
}

}  // namespace lightnet_ops

// linear_relu, device-independent: its schemas, its argument checkers, its ATen composition (double
// backward, the tangent) and its autograd kernel. The device kernels are in csrc/cpu/ and
// csrc/cuda/ (declarations they use: lightnet_ops/linear_relu.h); the contract is
// lightnet_ops/ops/linear_relu.py.
#include "lightnet_ops/linear_relu.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "lightnet_ops/autograd_op.h"
#include "lightnet_ops/composite.h"
#include "lightnet_ops/op_handles.h"

// The same schema text as the contract (tests/test_contracts.py compares them).
TORCH_LIBRARY_FRAGMENT(lightnet_ops, m) {
  // input (M, in_features) -> output (M, out_features).
  m.def("linear_relu(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  // `output` is the forward's output: it carries the ReLU gate. Returns (grad_input, grad_weight,
  // grad_bias); an entry whose output_mask is false (or grad_bias without a bias) is an empty [0] tensor.
  m.def(
      "linear_relu_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor output, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  // F.linear (no ReLU), internal: convnet_forward's last stage. Where no gradient or tangent is
  // recorded it runs the CPU GEMMs' rules (csrc/cpu/linear_relu.cpp); everywhere else, at::linear.
  m.def("_linear_no_grad(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
}

namespace lightnet_ops {

// ---- Argument checks (the C++ copy of the contract's checker) ---------------------------------

void check_linear_relu(const char* op, const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  using checks::PyTuple;
  TORCH_CHECK_VALUE(input.dim() == 2, op, ": the op expects 2-D input (M, in_features), got ", PyTuple{input.sizes()},
                    " (the Python API flattens leading dimensions)");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": expected 2-D weight (out_features, in_features), got ",
                    PyTuple{weight.sizes()});
  checks::check_floating(op, input);
  checks::check_same(op, input, weight, "weight");
  TORCH_CHECK_VALUE(input.size(1) == weight.size(1), op, ": input has ", input.size(1), " features but weight expects ",
                    weight.size(1));
  if (checks::has(bias)) {
    checks::check_same(op, input, *bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [",
                      weight.size(0), "], got ", bias->sizes());
  }
}

void check_linear_relu_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                const at::Tensor& weight, const at::Tensor& output) {
  check_linear_relu(op, input, weight, std::nullopt);
  const int64_t want[2] = {input.size(0), weight.size(0)};
  const auto check = [&](const at::Tensor& t, const char* name) {
    checks::check_same(op, input, t, name);
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(want), op, ": ", name, " has shape ", t.sizes(), ", expected ",
                      at::IntArrayRef(want));
  };
  check(grad_output, "grad_output");
  check(output, "output");
}

// ---- ATen composition and autograd ------------------------------------------------------------

namespace {

using autograd::Grads;
using autograd::Mask;
using composite::relu_passes;

// Named like the Python Function (graph node names, as for the conv).
struct LinearReLUFunction {
  using Output = at::Tensor;  // the output is also the ReLU gate backward routes by
  using Params = std::tuple<>;

  static at::Tensor forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            bool /*need_routing*/) {
    static const auto op =
        autograd::typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>(
            "lightnet_ops::linear_relu");
    return op.call(input, weight, bias);
  }

  static Grads backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                        const at::Tensor& output, Mask mask) {
    static const auto op =
        autograd::typed_op<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, Mask)>(
            "lightnet_ops::linear_relu_backward");
    return op.call(grad_output, input, weight, output, mask);
  }

  // The backward as ATen ops (differentiable); entries whose mask is false are undefined.
  static Grads composite_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                  const at::Tensor& output, Mask mask) {
    const at::Tensor gated = at::where(relu_passes(output), grad_output, at::zeros_like(grad_output));
    return {mask[0] ? gated.mm(weight) : at::Tensor(), mask[1] ? gated.t().mm(input) : at::Tensor(),
            mask[2] ? gated.sum(0) : at::Tensor()};
  }

  // relu-gated t_input @ W^T + x @ t_weight^T + t_bias.
  static at::Tensor tangent(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& t_input,
                            const at::Tensor& t_weight, const at::Tensor& t_bias, const at::Tensor& output) {
    const at::Tensor t = composite::sum_defined({t_input.defined() ? t_input.mm(weight.t()) : at::Tensor(),
                                                 t_weight.defined() ? input.mm(t_weight.t()) : at::Tensor(),
                                                 t_bias.defined() ? t_bias.expand({input.size(0), -1}) : at::Tensor()});
    if (!t.defined()) return at::zeros_like(output);
    return at::where(relu_passes(output), t, at::zeros_like(t));
  }
};

}  // namespace

// _linear_no_grad's autograd: at::linear (with its own autograd) when a gradient or tangent is
// recorded, else the device kernel below autograd.
at::Tensor linear_no_grad_autograd(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias) {
  if (records_autograd(input, weight, bias)) return at::linear(input, weight, bias);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return linear_no_grad_op().call(input, weight, bias);
}

TORCH_LIBRARY_IMPL(lightnet_ops, Autograd, m) {
  m.impl("linear_relu", &autograd::AutogradOp<LinearReLUFunction>::kernel);
  m.impl("_linear_no_grad", &linear_no_grad_autograd);
}

// Every backend without its own kernel (CUDA, Meta for fake tensors): stock's linear.
TORCH_LIBRARY_IMPL(lightnet_ops, CompositeExplicitAutograd, m) {
  m.impl("_linear_no_grad", [](const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias) { return at::linear(input, weight, bias); });
}

}  // namespace lightnet_ops

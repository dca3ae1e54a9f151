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

// Backward under create_graph=True whose results depend on something that requires grad: it
// must record its own graph (the differentiable formulation below) for a second derivative.
bool creates_graph(const variable_list& backward_inputs) {
  return at::GradMode::is_enabled() && any_requires_grad(backward_inputs);
}

// ---- Differentiable formulations (double backward and forward-mode AD) ---------------------
// The fused op is piecewise linear around its argmax: y = route(conv(x, w) + b), where route picks
// each pooled element's argmax position of the conv output (or 0 where ReLU zeroed it). With the
// routing fixed, ATen ops express the exact first-order backward (route^T, then conv's backward)
// and tangent (route of conv's tangent); autograd differentiates those ATen ops again, so second
// derivatives are exact. The fast kernels stay the path for plain first-order backward.

constexpr int64_t kArgmaxReluZero = 255;  // argmax byte: ReLU zeroed this element (lightnet_ops/_shapes.py)

int64_t conv_out_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  return (size + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}

// For each pooled element (N, K, PH*PW): the flat index into its conv-output plane (P*Q) that
// the argmax selects, and whether it is live (ReLU kept it).
std::pair<at::Tensor, at::Tensor> routing(const at::Tensor& argmax, int64_t Q, at::IntArrayRef pool_kernel_size,
                                          at::IntArrayRef pool_stride) {
  const at::Tensor a = argmax.to(at::kLong);
  const at::Tensor live = a.ne(kArgmaxReluZero);
  const auto opts = a.options();
  const at::Tensor ph = at::arange(a.size(2), opts).view({-1, 1}) * pool_stride[0];
  const at::Tensor pw = at::arange(a.size(3), opts).view({1, -1}) * pool_stride[1];
  const at::Tensor h = ph + at::floor_divide(a, pool_kernel_size[1]);
  const at::Tensor w = pw + at::remainder(a, pool_kernel_size[1]);
  const at::Tensor flat = at::where(live, h * Q + w, at::zeros_like(a));
  return {flat.flatten(2), live.flatten(2)};
}

// Conv2d's (P, Q) output size for the saved problem.
std::array<int64_t, 2> conv_plane(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  return {conv_out_size(input.size(2), weight.size(2), stride[0], padding[0], dilation[0]),
          conv_out_size(input.size(3), weight.size(3), stride[1], padding[1], dilation[1])};
}

Grads differentiable_conv_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                   const at::Tensor& argmax, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, at::IntArrayRef pool_kernel_size,
                                   at::IntArrayRef pool_stride, std::array<bool, 3> mask) {
  const auto [P, Q] = conv_plane(input, weight, stride, padding, dilation);
  const auto [flat, live] = routing(argmax, Q, pool_kernel_size, pool_stride);
  const int64_t N = grad_output.size(0), K = grad_output.size(1);
  const at::Tensor src = at::where(live, grad_output.flatten(2), at::zeros_like(grad_output.flatten(2)));
  // route^T: overlapping pool windows accumulate.
  const at::Tensor grad_conv =
      at::zeros({N, K, P * Q}, grad_output.options()).scatter_add(2, flat, src.to(input.scalar_type())).view(
          {N, K, P, Q});
  at::Tensor grad_input, grad_weight, grad_bias;
  if (mask[0] || mask[1]) {
    std::tie(grad_input, grad_weight, std::ignore) =
        at::convolution_backward(grad_conv, input, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, 1,
                                 {mask[0], mask[1], false});
  }
  if (mask[2]) grad_bias = grad_conv.sum({0, 2, 3});
  return {grad_input, grad_weight, grad_bias};
}

// Where linear_relu's output passes a gradient: not <= 0 (NaN included), as threshold_backward.
at::Tensor relu_passes(const at::Tensor& output) { return output.le(0).logical_not(); }

Grads differentiable_linear_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                     const at::Tensor& output, std::array<bool, 3> mask) {
  const at::Tensor gated = at::where(relu_passes(output), grad_output, at::zeros_like(grad_output));
  return {mask[0] ? gated.mm(weight) : at::Tensor(), mask[1] ? gated.t().mm(input) : at::Tensor(),
          mask[2] ? gated.sum(0) : at::Tensor()};
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

// Sum of the defined terms (each may be undefined).
at::Tensor sum_defined(std::initializer_list<at::Tensor> terms) {
  at::Tensor total;
  for (const auto& t : terms) {
    if (t.defined()) total = total.defined() ? total + t : t;
  }
  return total;
}

// Tangent of the fused conv: route(conv(tx, w) + conv(x, tw) + tb) with the forward's argmax.
at::Tensor conv_tangent(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& out, const at::Tensor& argmax, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef pool_kernel_size,
                        at::IntArrayRef pool_stride) {
  const at::Tensor x = input._fw_primal(0), w = weight._fw_primal(0);
  const at::Tensor tx = tangent(input), tw = tangent(weight), tb = tangent(bias);
  const auto [P, Q] = conv_plane(x, w, stride, padding, dilation);
  at::Tensor t_conv = sum_defined({tx.defined() ? at::conv2d(tx, w, {}, stride, padding, dilation) : at::Tensor(),
                                   tw.defined() ? at::conv2d(x, tw, {}, stride, padding, dilation) : at::Tensor(),
                                   tb.defined() ? tb.view({1, -1, 1, 1}).expand({x.size(0), -1, P, Q}) : at::Tensor()});
  const auto [flat, live] = routing(argmax, Q, pool_kernel_size, pool_stride);
  const at::Tensor picked = t_conv.flatten(2).gather(2, flat);
  return at::where(live, picked, at::zeros_like(picked)).view_as(out);
}

at::Tensor linear_tangent(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& out) {
  const at::Tensor x = input._fw_primal(0), w = weight._fw_primal(0);
  const at::Tensor tx = tangent(input), tw = tangent(weight), tb = tangent(bias);
  const at::Tensor t = sum_defined({tx.defined() ? tx.mm(w.t()) : at::Tensor(),
                                    tw.defined() ? x.mm(tw.t()) : at::Tensor(),
                                    tb.defined() ? tb.expand({x.size(0), -1}) : at::Tensor()});
  return at::where(relu_passes(out), t, at::zeros_like(t));
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
      if (creates_graph({grads[0], saved[0], saved[1]})) {
        std::tie(grad_input, grad_weight, grad_bias) = differentiable_conv_backward(
            grads[0], saved[0], saved[1], saved[2], p(0), p(1), p(2), p(3), p(4), mask);
      } else {
        const at::NoGradGuard no_grad;
        std::tie(grad_input, grad_weight, grad_bias) =
            conv_backward_op().call(grads[0], saved[0], saved[1], saved[2], p(0), p(1), p(2), p(3), p(4), mask);
      }
    }
    variable_list out = {if_needed(grad_input, mask[0]), if_needed(grad_weight, mask[1]),
                         if_needed(grad_bias, mask[2])};
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
      if (creates_graph({grads[0], saved[0], saved[1]})) {
        std::tie(grad_input, grad_weight, grad_bias) =
            differentiable_linear_backward(grads[0], saved[0], saved[1], saved[2], mask);
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
    bool need_argmax) {
  const bool records = records_graph(input, weight, bias);
  const bool dual = has_tangent(input, weight, bias);
  if (!records && !dual) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return conv_forward_op().call(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride,
                                  need_argmax);
  }
  // need_argmax=False with an input that requires grad (a graph traced or exported under no_grad,
  // then run with grad): the node still gets its argmax; the caller just does not see it.
  at::Tensor out, argmax;
  if (records) {
    // C++ custom Functions reject dual inputs; their primals carry the reverse-mode history.
    auto outs = Conv2dReLUMaxPool2dFunction::apply(primal(input), primal(weight), primal(bias), stride, padding,
                                                   dilation, pool_kernel_size, pool_stride);
    out = outs[0];
    argmax = outs[1];
  } else {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(out, argmax) =
        conv_forward_op().call(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, true);
  }
  if (dual) {  // forward-mode AD: the tangent routed through the same argmax
    out._set_fw_grad(
        conv_tangent(input, weight, bias, out, argmax, stride, padding, dilation, pool_kernel_size, pool_stride),
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
  if (dual) out._set_fw_grad(linear_tangent(input, weight, bias, out), /*level=*/0, /*is_inplace_op=*/false);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lightnet_ops, Autograd, m) {
  m.impl("conv2d_relu_maxpool2d", &conv2d_relu_maxpool2d_autograd);
  m.impl("linear_relu", &linear_relu_autograd);
}

}  // namespace lightnet_ops

// conv2d_relu_maxpool2d, device-independent: its schemas, its argument checkers, its ATen
// composition (the pool options the kernels do not take; double backward; the tangent) and its
// autograd kernel. The device kernels are in csrc/cpu/ and csrc/cuda/ (declarations they use:
// lightnet_ops/conv2d_relu_maxpool2d.h); the contract is lightnet_ops/ops/conv2d_relu_maxpool2d.py.
#include "lightnet_ops/conv2d_relu_maxpool2d.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "lightnet_ops/autograd_op.h"
#include "lightnet_ops/window_math.h"

// The same schema text as the contract (tests/test_contracts.py compares them).
TORCH_LIBRARY_FRAGMENT(lightnet_ops, m) {
  // Returns (output (N, K, PH, PW), argmax). argmax is uint8 (N, K, PH, PW): the offset of the
  // selected element inside its pool window (row-major), or 255 where ReLU zeroed the output.
  // It is an empty uint8 tensor when need_argmax is false (inference).
  m.def(
      "conv2d_relu_maxpool2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int[2] pool_kernel_size, int[2] pool_stride, bool need_argmax, int[2] pool_padding=[0, 0], "
      "bool ceil_mode=False) -> (Tensor, Tensor)");
  // Returns (grad_input, grad_weight, grad_bias); an entry whose output_mask is false (or
  // grad_bias without a bias) is an empty tensor of shape [0].
  m.def(
      "conv2d_relu_maxpool2d_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor argmax, "
      "int[2] stride, int[2] padding, int[2] dilation, int[2] pool_kernel_size, int[2] pool_stride, "
      "bool[3] output_mask, int[2] pool_padding=[0, 0], bool ceil_mode=False) -> (Tensor, Tensor, Tensor)");
}

namespace lightnet_ops {

// ---- Argument checks (the C++ copy of the contract's checker) ---------------------------------

ConvPoolShape check_conv2d_relu_maxpool2d(const char* op, const at::Tensor& input, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                          at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride) {
  using checks::PyTuple;
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": expected 4-D input (N, C, H, W), got ", input.dim(),
                    "-D input of shape ", PyTuple{input.sizes()});
  TORCH_CHECK_VALUE(weight.dim() == 4, op, ": expected 4-D weight (out_channels, in_channels, kH, kW), got ",
                    PyTuple{weight.sizes()});
  checks::check_floating(op, input);
  checks::check_same(op, input, weight, "weight");
  TORCH_CHECK_VALUE(input.size(1) == weight.size(1), op, ": input has ", input.size(1), " channels but weight expects ",
                    weight.size(1), " (groups=1 only)");
  if (checks::has(bias)) {
    checks::check_same(op, input, *bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [",
                      weight.size(0), "], got ", bias->sizes());
  }
  const struct {
    const char* name;
    at::IntArrayRef v;
    int64_t low;
  } lists[] = {{"stride", stride, 1},
               {"padding", padding, 0},
               {"dilation", dilation, 1},
               {"pool_kernel_size", pool_kernel_size, 1},
               {"pool_stride", pool_stride, 1}};
  for (const auto& l : lists) {
    TORCH_CHECK_VALUE(l.v.size() == 2, op, ": ", l.name, " must have 2 elements, got ", l.v);
    TORCH_CHECK_VALUE(l.v[0] >= l.low && l.v[1] >= l.low, op, ": ", l.name, " must be ",
                      l.low ? "positive" : "non-negative", ", got ", l.v);
  }
  // Each factor is at least 1, so a factor above the limit decides before the product can overflow.
  TORCH_CHECK_VALUE(pool_kernel_size[0] <= kMaxPoolWindow && pool_kernel_size[1] <= kMaxPoolWindow &&
                        pool_kernel_size[0] * pool_kernel_size[1] <= kMaxPoolWindow,
                    op, ": pool window ", pool_kernel_size, " has more than ", kMaxPoolWindow,
                    " elements; the one-byte argmax cannot address it");
  TORCH_CHECK_VALUE(weight.size(2) > 0 && weight.size(3) > 0, op, ": kernel size must be positive, got ",
                    weight.sizes());
  ConvPoolShape s;
  s.N = input.size(0);
  s.C = input.size(1);
  s.H = input.size(2);
  s.W = input.size(3);
  s.K = weight.size(0);
  s.R = weight.size(2);
  s.S = weight.size(3);
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dil_h = dilation[0];
  s.dil_w = dilation[1];
  s.P = checks::checked_conv_out_size(op, s.H, s.R, s.stride_h, s.pad_h, s.dil_h);
  s.Q = checks::checked_conv_out_size(op, s.W, s.S, s.stride_w, s.pad_w, s.dil_w);
  TORCH_CHECK_VALUE(s.P > 0 && s.Q > 0, op, ": input of spatial size (", s.H, ", ", s.W, ") is too small for kernel (",
                    s.R, ", ", s.S, ") with padding ", padding, " and dilation ", dilation);
  s.pool_kh = pool_kernel_size[0];
  s.pool_kw = pool_kernel_size[1];
  s.pool_sh = pool_stride[0];
  s.pool_sw = pool_stride[1];
  TORCH_CHECK_VALUE(s.pool_kh <= s.P && s.pool_kw <= s.Q, op, ": pool window (", s.pool_kh, ", ", s.pool_kw,
                    ") is larger than the conv output (", s.P, ", ", s.Q, ")");
  s.PH = pool_out_size(s.P, s.pool_kh, s.pool_sh);
  s.PW = pool_out_size(s.Q, s.pool_kw, s.pool_sw);
  return s;
}

ConvPoolShape check_conv2d_relu_maxpool2d_backward(const char* op, const at::Tensor& grad_output,
                                                   const at::Tensor& input, const at::Tensor& weight,
                                                   const at::Tensor& argmax, at::IntArrayRef stride,
                                                   at::IntArrayRef padding, at::IntArrayRef dilation,
                                                   at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride) {
  const ConvPoolShape s = check_conv2d_relu_maxpool2d(op, input, weight, std::nullopt, stride, padding, dilation,
                                                      pool_kernel_size, pool_stride);
  checks::check_same(op, input, grad_output, "grad_output");
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({s.N, s.K, s.PH, s.PW}), op, ": grad_output has shape ",
                    grad_output.sizes(), ", expected [", s.N, ", ", s.K, ", ", s.PH, ", ", s.PW, "]");
  TORCH_CHECK_TYPE(argmax.scalar_type() == at::kByte, op, ": argmax must be uint8 (torch.uint8), got ",
                   checks::PyDtype{argmax.scalar_type()});
  TORCH_CHECK_VALUE(argmax.device() == input.device(), op, ": input is on ", input.device(), " but argmax is on ",
                    argmax.device());
  TORCH_CHECK_VALUE(argmax.sizes() == grad_output.sizes(), op, ": argmax has shape ", argmax.sizes(), ", expected ",
                    grad_output.sizes(), " (was the forward run with need_argmax=true?)");
  return s;
}

namespace composite {
namespace {

// Conv2d's (P, Q) output size.
std::array<int64_t, 2> conv_plane(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  return {conv_out_size(input.size(2), weight.size(2), stride[0], padding[0], dilation[0]),
          conv_out_size(input.size(3), weight.size(3), stride[1], padding[1], dilation[1])};
}

// Tangent of the output: route(conv(t_input, w) + conv(x, t_weight) + t_bias) through the argmax;
// undefined tangents count as zero.
at::Tensor conv_tangent(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& t_input,
                        const at::Tensor& t_weight, const at::Tensor& t_bias, const at::Tensor& argmax,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, const Pool& pool) {
  const auto [P, Q] = conv_plane(input, weight, stride, padding, dilation);
  const at::Tensor t_conv = sum_defined(
      {t_input.defined() ? at::conv2d(t_input, weight, {}, stride, padding, dilation) : at::Tensor(),
       t_weight.defined() ? at::conv2d(input, t_weight, {}, stride, padding, dilation) : at::Tensor(),
       t_bias.defined() ? t_bias.view({1, -1, 1, 1}).expand({input.size(0), -1, P, Q}) : at::Tensor()});
  if (!t_conv.defined()) return at::zeros(argmax.sizes(), input.options());
  const auto [flat, live] = routing(argmax, Q, pool);
  const at::Tensor picked = t_conv.flatten(2).gather(2, flat);
  return at::where(live, picked, at::zeros_like(picked)).view(argmax.sizes());
}

}  // namespace

// ---- ATen composition ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> conv_forward(const at::Tensor& input, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation, const Pool& pool,
                                                bool need_argmax) {
  const at::Tensor conv = at::conv2d(input, weight, bias, stride, padding, dilation);  // (N, K, P, Q)
  auto [pre, flat_idx] = at::max_pool2d_with_indices(conv, pool.kernel, pool.stride, pool.padding, {1, 1},
                                                     pool.ceil_mode);
  const at::Tensor out = at::relu(pre);
  if (!need_argmax) return {out, at::empty({0}, input.options().dtype(at::kByte))};
  // flat_idx indexes the (P, Q) plane; turn it into an offset inside the pool window.
  const int64_t Q = conv.size(3);
  const auto [oh, ow] = window_origins(pre.size(2), pre.size(3), pool, flat_idx.options());
  const at::Tensor offset = (at::floor_divide(flat_idx, Q) - oh) * pool.kernel[1] + at::remainder(flat_idx, Q) - ow;
  const at::Tensor argmax = at::where(relu_passes(pre), offset, at::full_like(offset, kArgmaxReluZero));
  return {out, argmax.to(at::kByte)};
}

Grads conv_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                    const at::Tensor& argmax, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation, const Pool& pool, std::array<bool, 3> mask) {
  const auto [P, Q] = conv_plane(input, weight, stride, padding, dilation);
  const auto [flat, live] = routing(argmax, Q, pool);
  const int64_t N = grad_output.size(0), K = grad_output.size(1);
  const at::Tensor go = grad_output.flatten(2);
  const at::Tensor src = at::where(live, go, at::zeros_like(go)).to(input.scalar_type());
  // route^T: overlapping pool windows accumulate.
  const at::Tensor grad_conv =
      at::zeros({N, K, P * Q}, input.options()).scatter_add(2, flat, src).view({N, K, P, Q});
  at::Tensor grad_input, grad_weight, grad_bias;
  if (mask[0] || mask[1]) {
    std::tie(grad_input, grad_weight, std::ignore) =
        at::convolution_backward(grad_conv, input, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, 1,
                                 {mask[0], mask[1], false});
  }
  if (mask[2]) grad_bias = grad_conv.sum({0, 2, 3});
  return {grad_input, grad_weight, grad_bias};
}

void check_pool_padding(at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_padding) {
  TORCH_CHECK_VALUE(pool_padding.size() == 2 && pool_padding[0] >= 0 && pool_padding[1] >= 0,
                    "conv2d_relu_maxpool2d: pool_padding must be non-negative, got ", pool_padding);
  TORCH_CHECK_VALUE(2 * pool_padding[0] <= pool_kernel_size[0] && 2 * pool_padding[1] <= pool_kernel_size[1],
                    "conv2d_relu_maxpool2d: pool_padding ", pool_padding, " must be at most half of pool_kernel_size ",
                    pool_kernel_size, " (as max_pool2d)");
}

}  // namespace composite

// ---- Autograd -----------------------------------------------------------------------------------

namespace {

using IntList = at::IntArrayRef;

// Named like the Python Function: graph nodes read CppNode<...AutogradOp<...Conv2dReLUMaxPool2dFunction>>.
struct Conv2dReLUMaxPool2dFunction {
  using Output = std::tuple<at::Tensor, at::Tensor>;  // (output, argmax)
  // stride, padding, dilation, pool_kernel_size, pool_stride, pool_padding, ceil_mode
  using Params = std::tuple<IntList, IntList, IntList, IntList, IntList, IntList, bool>;

  static Output forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        bool need_argmax, IntList stride, IntList padding, IntList dilation, IntList pool_kernel_size,
                        IntList pool_stride, IntList pool_padding, bool ceil_mode) {
    static const auto op =
        autograd::typed_op<Output(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, IntList,
                                  IntList, IntList, IntList, IntList, bool, IntList, bool)>(
            "lightnet_ops::conv2d_relu_maxpool2d");
    return op.call(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, need_argmax,
                   pool_padding, ceil_mode);
  }

  static autograd::Grads backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                  const at::Tensor& argmax, autograd::Mask mask, IntList stride, IntList padding,
                                  IntList dilation, IntList pool_kernel_size, IntList pool_stride,
                                  IntList pool_padding, bool ceil_mode) {
    static const auto op =
        autograd::typed_op<autograd::Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           IntList, IntList, IntList, IntList, IntList, autograd::Mask, IntList,
                                           bool)>("lightnet_ops::conv2d_relu_maxpool2d_backward");
    return op.call(grad_output, input, weight, argmax, stride, padding, dilation, pool_kernel_size, pool_stride, mask,
                   pool_padding, ceil_mode);
  }

  static autograd::Grads composite_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                            const at::Tensor& weight, const at::Tensor& argmax, autograd::Mask mask,
                                            IntList stride, IntList padding, IntList dilation,
                                            IntList pool_kernel_size, IntList pool_stride, IntList pool_padding,
                                            bool ceil_mode) {
    return composite::conv_backward(grad_output, input, weight, argmax, stride, padding, dilation,
                                    {pool_kernel_size, pool_stride, pool_padding, ceil_mode}, mask);
  }

  static at::Tensor tangent(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& t_input,
                            const at::Tensor& t_weight, const at::Tensor& t_bias, const at::Tensor& argmax,
                            IntList stride, IntList padding, IntList dilation, IntList pool_kernel_size,
                            IntList pool_stride, IntList pool_padding, bool ceil_mode) {
    return composite::conv_tangent(input, weight, t_input, t_weight, t_bias, argmax, stride, padding, dilation,
                                   {pool_kernel_size, pool_stride, pool_padding, ceil_mode});
  }
};

// The schema's argument order, need_argmax included.
std::tuple<at::Tensor, at::Tensor> conv2d_relu_maxpool2d_autograd(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, IntList stride,
    IntList padding, IntList dilation, IntList pool_kernel_size, IntList pool_stride, bool need_argmax,
    IntList pool_padding, bool ceil_mode) {
  return autograd::AutogradOp<Conv2dReLUMaxPool2dFunction>::call(need_argmax, input, weight, bias, stride, padding, dilation,
                                                           pool_kernel_size, pool_stride, pool_padding, ceil_mode);
}

}  // namespace

TORCH_LIBRARY_IMPL(lightnet_ops, Autograd, m) { m.impl("conv2d_relu_maxpool2d", &conv2d_relu_maxpool2d_autograd); }

}  // namespace lightnet_ops

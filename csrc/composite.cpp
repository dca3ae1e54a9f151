// ATen compositions of the fused ops: see lightnet_ops/composite.h.
#include "lightnet_ops/composite.h"

#include <ATen/ATen.h>

#include "lightnet_ops/window_math.h"

namespace lightnet_ops::composite {
namespace {

// Conv2d's (P, Q) output size.
std::array<int64_t, 2> conv_plane(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation) {
  return {conv_out_size(input.size(2), weight.size(2), stride[0], padding[0], dilation[0]),
          conv_out_size(input.size(3), weight.size(3), stride[1], padding[1], dilation[1])};
}

// Conv-output row (PH, 1) and column (1, PW) where each pool window starts (negative inside the
// pool padding): argmax offsets count from there.
std::pair<at::Tensor, at::Tensor> window_origins(int64_t PH, int64_t PW, const Pool& pool,
                                                 const at::TensorOptions& opts) {
  return {at::arange(PH, opts).view({-1, 1}) * pool.stride[0] - pool.padding[0],
          at::arange(PW, opts).view({1, -1}) * pool.stride[1] - pool.padding[1]};
}

// For each pooled element, flattened to (N, K, PH*PW): the index into its conv-output plane (P*Q)
// that the argmax selects (0 where not live), and whether it is live (ReLU kept it).
std::pair<at::Tensor, at::Tensor> routing(const at::Tensor& argmax, int64_t Q, const Pool& pool) {
  const at::Tensor a = argmax.to(at::kLong);
  const at::Tensor live = a.ne(kArgmaxReluZero);
  const auto [oh, ow] = window_origins(a.size(2), a.size(3), pool, a.options());
  const at::Tensor h = oh + at::floor_divide(a, pool.kernel[1]);
  const at::Tensor w = ow + at::remainder(a, pool.kernel[1]);
  const at::Tensor flat = at::where(live, h * Q + w, at::zeros_like(a));
  return {flat.flatten(2), live.flatten(2)};
}

// Where ReLU passes a gradient: not <= 0 (NaN included), as threshold_backward.
at::Tensor relu_passes(const at::Tensor& t) { return t.le(0).logical_not(); }

// Sum of the defined terms (each may be undefined).
at::Tensor sum_defined(std::initializer_list<at::Tensor> terms) {
  at::Tensor total;
  for (const auto& t : terms) {
    if (t.defined()) total = total.defined() ? total + t : t;
  }
  return total;
}

}  // namespace

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

Grads linear_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                      const at::Tensor& output, std::array<bool, 3> mask) {
  const at::Tensor gated = at::where(relu_passes(output), grad_output, at::zeros_like(grad_output));
  return {mask[0] ? gated.mm(weight) : at::Tensor(), mask[1] ? gated.t().mm(input) : at::Tensor(),
          mask[2] ? gated.sum(0) : at::Tensor()};
}

at::Tensor linear_tangent(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& t_input,
                          const at::Tensor& t_weight, const at::Tensor& t_bias, const at::Tensor& output) {
  const at::Tensor t = sum_defined({t_input.defined() ? t_input.mm(weight.t()) : at::Tensor(),
                                    t_weight.defined() ? input.mm(t_weight.t()) : at::Tensor(),
                                    t_bias.defined() ? t_bias.expand({input.size(0), -1}) : at::Tensor()});
  if (!t.defined()) return at::zeros_like(output);
  return at::where(relu_passes(output), t, at::zeros_like(t));
}

void check_pool_padding(at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_padding) {
  TORCH_CHECK_VALUE(pool_padding.size() == 2 && pool_padding[0] >= 0 && pool_padding[1] >= 0,
                    "conv2d_relu_maxpool2d: pool_padding must be non-negative, got ", pool_padding);
  TORCH_CHECK_VALUE(2 * pool_padding[0] <= pool_kernel_size[0] && 2 * pool_padding[1] <= pool_kernel_size[1],
                    "conv2d_relu_maxpool2d: pool_padding ", pool_padding, " must be at most half of pool_kernel_size ",
                    pool_kernel_size, " (as max_pool2d)");
}

at::Tensor empty_if_undefined(const at::Tensor& grad, const at::Tensor& like) {
  return grad.defined() ? grad : at::empty({0}, like.options());
}

}  // namespace lightnet_ops::composite

// Shared building blocks of the ATen compositions: see lightnet_ops/composite.h.
#include "lightnet_ops/composite.h"

#include <ATen/ATen.h>

#include "lightnet_ops/window_math.h"

namespace lightnet_ops::composite {

std::pair<at::Tensor, at::Tensor> window_origins(int64_t PH, int64_t PW, const Pool& pool,
                                                 const at::TensorOptions& opts) {
  return {at::arange(PH, opts).view({-1, 1}) * pool.stride[0] - pool.padding[0],
          at::arange(PW, opts).view({1, -1}) * pool.stride[1] - pool.padding[1]};
}

std::pair<at::Tensor, at::Tensor> routing(const at::Tensor& argmax, int64_t Q, const Pool& pool) {
  const at::Tensor a = argmax.to(at::kLong);
  const at::Tensor live = a.ne(kArgmaxReluZero);
  const auto [oh, ow] = window_origins(a.size(2), a.size(3), pool, a.options());
  const at::Tensor h = oh + at::floor_divide(a, pool.kernel[1]);
  const at::Tensor w = ow + at::remainder(a, pool.kernel[1]);
  const at::Tensor flat = at::where(live, h * Q + w, at::zeros_like(a));
  return {flat.flatten(2), live.flatten(2)};
}

at::Tensor relu_passes(const at::Tensor& t) { return t.le(0).logical_not(); }

at::Tensor sum_defined(std::initializer_list<at::Tensor> terms) {
  at::Tensor total;
  for (const auto& t : terms) {
    if (t.defined()) total = total.defined() ? total + t : t;
  }
  return total;
}

at::Tensor empty_if_undefined(const at::Tensor& grad, const at::Tensor& like) {
  return grad.defined() ? grad : at::empty({0}, like.options());
}

}  // namespace lightnet_ops::composite

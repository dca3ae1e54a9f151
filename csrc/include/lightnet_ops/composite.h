// Building blocks of the fused ops written as ATen compositions (device-independent: CPU and CUDA
// alike), shared by the ops' files (csrc/<op>.cpp).
//
// Each op's composition is the same arithmetic as its Python reference (lightnet_ops/ops/<op>.py).
// It serves where no hand-written kernel applies (pool padding, ceil mode) and, being made of
// differentiable ATen ops, for double backward and forward-mode AD (autograd_op.h): with the
// routing (argmax, ReLU gate) fixed the ops are piecewise linear, so autograd through them is exact.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <initializer_list>
#include <tuple>
#include <utility>

namespace lightnet_ops::composite {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // (grad_input, grad_weight, grad_bias)

// The pool parameters of one problem: window, stride, padding (as -inf), ceil mode.
struct Pool {
  at::IntArrayRef kernel, stride, padding;
  bool ceil_mode;
};

// Whether a problem needs the composite path: the kernels implement floor-mode unpadded pools only.
inline bool pool_needs_composite(at::IntArrayRef pool_padding, bool ceil_mode) {
  return ceil_mode || pool_padding[0] != 0 || pool_padding[1] != 0;
}

// The pool input's row (PH, 1) and column (1, PW) where each pool window starts (negative inside
// the pool padding): argmax offsets count from there.
std::pair<at::Tensor, at::Tensor> window_origins(int64_t PH, int64_t PW, const Pool& pool,
                                                 const at::TensorOptions& opts);

// For each pooled element of a one-byte argmax (N, K, PH, PW), flattened to (N, K, PH*PW): the
// index into its pool input plane (rows of Q elements) that the argmax selects (0 where not
// live), and whether it is live (ReLU kept it).
std::pair<at::Tensor, at::Tensor> routing(const at::Tensor& argmax, int64_t Q, const Pool& pool);

// Where ReLU passes a gradient: not <= 0 (NaN included), as threshold_backward.
at::Tensor relu_passes(const at::Tensor& t);

// Sum of the defined terms (each may be undefined; undefined if all are).
at::Tensor sum_defined(std::initializer_list<at::Tensor> terms);

// A backward op's result for an output it was not asked for: an empty [0] tensor.
at::Tensor empty_if_undefined(const at::Tensor& grad, const at::Tensor& like);

}  // namespace lightnet_ops::composite

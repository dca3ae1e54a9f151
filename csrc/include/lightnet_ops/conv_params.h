// Argument checking and shape bookkeeping for conv2d_relu_maxpool2d, shared by every device's
// kernels so that all of them reject bad input with the same message.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include "lightnet_ops/window_math.h"

namespace lightnet_ops {

// Sizes of one conv2d_relu_maxpool2d problem. Layout names: N batch, C input channels,
// K output channels, H x W input, R x S filter, P x Q conv output, PH x PW pooled output.
struct ConvPoolShape {
  int64_t N, C, H, W;
  int64_t K, R, S;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t P, Q;                // conv output (never materialised by the fused paths)
  int64_t pool_kh, pool_kw, pool_sh, pool_sw;
  int64_t PH, PW;              // pooled output
};

inline void check_pair(at::IntArrayRef v, const char* name) {
  TORCH_CHECK(v.size() == 2, "conv2d_relu_maxpool2d: ", name, " must have 2 elements, got ", v.size());
}

// Validates the arguments and returns the problem's sizes. `input` is (N, C, H, W),
// `weight` is (K, C, R, S), `bias` is (K) or undefined.
inline ConvPoolShape conv_pool_shape(const at::Tensor& input, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation,
                                     at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride) {
  TORCH_CHECK(input.dim() == 4, "conv2d_relu_maxpool2d: expected 4-D input (N, C, H, W), got ", input.dim(),
              "-D input of shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, "conv2d_relu_maxpool2d: expected 4-D weight (out_channels, in_channels, kH, kW), got ",
              weight.dim(), "-D weight of shape ", weight.sizes());
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "conv2d_relu_maxpool2d: input dtype ", input.scalar_type(),
              " does not match weight dtype ", weight.scalar_type());
  TORCH_CHECK(input.device() == weight.device(), "conv2d_relu_maxpool2d: input is on ", input.device(),
              " but weight is on ", weight.device());
  TORCH_CHECK(input.size(1) == weight.size(1), "conv2d_relu_maxpool2d: input has ", input.size(1),
              " channels but weight expects ", weight.size(1), " (groups=1 only)");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "conv2d_relu_maxpool2d: bias must have shape [",
                weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "conv2d_relu_maxpool2d: bias dtype ",
                bias->scalar_type(), " does not match weight dtype ", weight.scalar_type());
    TORCH_CHECK(bias->device() == weight.device(), "conv2d_relu_maxpool2d: bias is on ", bias->device(),
                " but weight is on ", weight.device());
  }
  check_pair(stride, "stride");
  check_pair(padding, "padding");
  check_pair(dilation, "dilation");
  check_pair(pool_kernel_size, "pool_kernel_size");
  check_pair(pool_stride, "pool_stride");
  for (const auto i : c10::irange(2)) {
    TORCH_CHECK(stride[i] > 0, "conv2d_relu_maxpool2d: stride must be positive, got ", stride);
    TORCH_CHECK(padding[i] >= 0, "conv2d_relu_maxpool2d: padding must be non-negative, got ", padding);
    TORCH_CHECK(dilation[i] > 0, "conv2d_relu_maxpool2d: dilation must be positive, got ", dilation);
    TORCH_CHECK(pool_kernel_size[i] > 0, "conv2d_relu_maxpool2d: pool_kernel_size must be positive, got ",
                pool_kernel_size);
    TORCH_CHECK(pool_stride[i] > 0, "conv2d_relu_maxpool2d: pool_stride must be positive, got ", pool_stride);
  }
  TORCH_CHECK(pool_kernel_size[0] * pool_kernel_size[1] <= kMaxPoolWindow,
              "conv2d_relu_maxpool2d: pool window ", pool_kernel_size, " has more than ", kMaxPoolWindow,
              " elements; the one-byte argmax cannot address it");
  TORCH_CHECK(weight.size(2) > 0 && weight.size(3) > 0, "conv2d_relu_maxpool2d: kernel size must be positive, got ",
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
  s.P = conv_out_size(s.H, s.R, s.stride_h, s.pad_h, s.dil_h);
  s.Q = conv_out_size(s.W, s.S, s.stride_w, s.pad_w, s.dil_w);
  TORCH_CHECK(s.P > 0 && s.Q > 0, "conv2d_relu_maxpool2d: input of spatial size (", s.H, ", ", s.W,
              ") is too small for kernel (", s.R, ", ", s.S, ") with padding ", padding, " and dilation ", dilation);
  s.pool_kh = pool_kernel_size[0];
  s.pool_kw = pool_kernel_size[1];
  s.pool_sh = pool_stride[0];
  s.pool_sw = pool_stride[1];
  TORCH_CHECK(s.pool_kh <= s.P && s.pool_kw <= s.Q, "conv2d_relu_maxpool2d: pool window (", s.pool_kh, ", ",
              s.pool_kw, ") is larger than the conv output (", s.P, ", ", s.Q, ")");
  s.PH = pool_out_size(s.P, s.pool_kh, s.pool_sh);
  s.PW = pool_out_size(s.Q, s.pool_kw, s.pool_sw);
  return s;
}

// Validates the arguments of linear_relu: input (M, in_features), weight (out_features, in_features).
inline void check_linear(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2, "linear_relu: the op expects 2-D input (M, in_features), got ", input.sizes(),
              " (the Python API flattens leading dimensions)");
  TORCH_CHECK(weight.dim() == 2, "linear_relu: expected 2-D weight (out_features, in_features), got ",
              weight.sizes());
  TORCH_CHECK(input.size(1) == weight.size(1), "linear_relu: input has ", input.size(1),
              " features but weight expects ", weight.size(1));
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "linear_relu: input dtype ", input.scalar_type(),
              " does not match weight dtype ", weight.scalar_type());
  TORCH_CHECK(input.device() == weight.device(), "linear_relu: input is on ", input.device(), " but weight is on ",
              weight.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "linear_relu: bias must have shape [",
                weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "linear_relu: bias dtype ", bias->scalar_type(),
                " does not match weight dtype ", weight.scalar_type());
    TORCH_CHECK(bias->device() == weight.device(), "linear_relu: bias is on ", bias->device(),
                " but weight is on ", weight.device());
  }
}

}  // namespace lightnet_ops

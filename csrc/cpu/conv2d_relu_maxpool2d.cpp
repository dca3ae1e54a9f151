// CPU kernels for conv2d_relu_maxpool2d (float32, float64).
//
// Forward: ATen's convolution (no bias) into a scratch buffer, then one fused pass that adds the
// bias, max-pools, applies ReLU and writes the pooled output plus the one-byte argmax.
// Backward: the pooled gradient is routed through the argmax (ReLU-zeroed entries carry the
// sentinel and are skipped) into the conv-output gradient, whose sum is the bias gradient; the
// input and weight gradients come from ATen's convolution_backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lightnet_ops/conv_params.h"

namespace lightnet_ops {
namespace {

void check_cpu_dtype(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
              ": the cpu backend supports float32 and float64, got ", t.scalar_type(),
              " (use backend=\"reference\" for other dtypes)");
}

// Bias + max-pool + ReLU over a dense conv output (N, K, P, Q), contiguous.
template <typename scalar_t>
void bias_relu_pool(const ConvPoolShape& s, const scalar_t* conv, const scalar_t* bias, scalar_t* out,
                    uint8_t* argmax) {
  const int64_t planes = s.N * s.K;
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t b = bias ? bias[plane % s.K] : scalar_t(0);
      const scalar_t* src = conv + plane * s.P * s.Q;
      scalar_t* dst = out + plane * s.PH * s.PW;
      uint8_t* am = argmax ? argmax + plane * s.PH * s.PW : nullptr;
      for (int64_t ph = 0; ph < s.PH; ++ph) {
        for (int64_t pw = 0; pw < s.PW; ++pw) {
          const scalar_t* win = src + ph * s.pool_sh * s.Q + pw * s.pool_sw;
          // The bias is added before comparing: rounding can make x1 + b == x2 + b for x1 > x2,
          // and stock's first-maximum tie rule is defined on the biased values.
          scalar_t best = win[0] + b;
          int64_t best_off = 0;
          for (int64_t i = 0; i < s.pool_kh; ++i) {
            for (int64_t j = 0; j < s.pool_kw; ++j) {
              const scalar_t v = win[i * s.Q + j] + b;
              if (pool_takes(v, best)) {
                best = v;
                best_off = i * s.pool_kw + j;
              }
            }
          }
          dst[ph * s.PW + pw] = relu(best);
          if (am) am[ph * s.PW + pw] = encode_argmax(best, best_off);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_maxpool2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                                                             const c10::optional<at::Tensor>& bias,
                                                             at::IntArrayRef stride, at::IntArrayRef padding,
                                                             at::IntArrayRef dilation, at::IntArrayRef pool_kernel_size,
                                                             at::IntArrayRef pool_stride, bool need_argmax) {
  const ConvPoolShape s =
      conv_pool_shape(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride);
  check_cpu_dtype(input, "conv2d_relu_maxpool2d");
  auto out = at::empty({s.N, s.K, s.PH, s.PW}, input.options());
  auto argmax = need_argmax ? at::empty({s.N, s.K, s.PH, s.PW}, input.options().dtype(at::kByte))
                            : at::empty({0}, input.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, argmax};
  const auto conv = at::convolution(input, weight, c10::nullopt, stride, padding, dilation, false, {0, 0}, 1)
                        .contiguous();
  const at::Tensor b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_cpu", [&] {
    bias_relu_pool<scalar_t>(s, conv.const_data_ptr<scalar_t>(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                             out.mutable_data_ptr<scalar_t>(), need_argmax ? argmax.mutable_data_ptr<uint8_t>() : nullptr);
  });
  return {out, argmax};
}

// Scatters the pooled gradient (N, K, PH, PW) through the argmax into the conv-output gradient
// (N, K, P, Q), zero-initialised. Planes are independent, so overlapping windows (pool stride <
// pool window) accumulate without races.
template <typename scalar_t>
void route_grad(const ConvPoolShape& s, const scalar_t* grad_out, const uint8_t* argmax, scalar_t* grad_conv) {
  at::parallel_for(0, s.N * s.K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* g = grad_out + plane * s.PH * s.PW;
      const uint8_t* am = argmax + plane * s.PH * s.PW;
      scalar_t* dst = grad_conv + plane * s.P * s.Q;
      for (int64_t ph = 0; ph < s.PH; ++ph) {
        for (int64_t pw = 0; pw < s.PW; ++pw) {
          const uint8_t a = am[ph * s.PW + pw];
          if (a == kArgmaxReluZero) continue;
          const int64_t h = ph * s.pool_sh + a / s.pool_kw;
          const int64_t w = pw * s.pool_sw + a % s.pool_kw;
          dst[h * s.Q + w] += g[ph * s.PW + pw];
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_maxpool2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& argmax,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef pool_kernel_size,
    at::IntArrayRef pool_stride, std::array<bool, 3> output_mask) {
  const ConvPoolShape s =
      conv_pool_shape(input, weight, c10::nullopt, stride, padding, dilation, pool_kernel_size, pool_stride);
  check_cpu_dtype(input, "conv2d_relu_maxpool2d_backward");
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({s.N, s.K, s.PH, s.PW}),
              "conv2d_relu_maxpool2d_backward: grad_output has shape ", grad_output.sizes(), ", expected [", s.N, ", ",
              s.K, ", ", s.PH, ", ", s.PW, "]");
  TORCH_CHECK(argmax.scalar_type() == at::kByte && argmax.sizes() == grad_output.sizes(),
              "conv2d_relu_maxpool2d_backward: argmax must be uint8 of shape ", grad_output.sizes(), ", got ",
              argmax.scalar_type(), " ", argmax.sizes(), " (was the forward run with need_argmax=true?)");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "conv2d_relu_maxpool2d_backward: grad_output dtype ",
              grad_output.scalar_type(), " does not match input dtype ", input.scalar_type());
  // Each masked-off output is its own empty tensor: outputs must not alias.
  const auto empty = [&] { return at::empty({0}, input.options()); };
  auto grad_conv = at::zeros({s.N, s.K, s.P, s.Q}, input.options());
  if (grad_conv.numel() > 0) {
    const auto g = grad_output.contiguous();
    const auto am = argmax.contiguous();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_backward_cpu", [&] {
      route_grad<scalar_t>(s, g.const_data_ptr<scalar_t>(), am.const_data_ptr<uint8_t>(),
                           grad_conv.mutable_data_ptr<scalar_t>());
    });
  }
  at::Tensor grad_input = empty(), grad_weight = empty(), grad_bias = empty();
  if (output_mask[0] || output_mask[1]) {
    auto grads = at::convolution_backward(grad_conv, input, weight, c10::nullopt, stride, padding, dilation, false,
                                          {0, 0}, 1, {output_mask[0], output_mask[1], false});
    if (output_mask[0]) grad_input = std::get<0>(grads);
    if (output_mask[1]) grad_weight = std::get<1>(grads);
  }
  if (output_mask[2]) grad_bias = grad_conv.sum({0, 2, 3});
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(lightnet_ops, CPU, m) {
  m.impl("conv2d_relu_maxpool2d", &conv2d_relu_maxpool2d_cpu);
  m.impl("conv2d_relu_maxpool2d_backward", &conv2d_relu_maxpool2d_backward_cpu);
}

}  // namespace lightnet_ops

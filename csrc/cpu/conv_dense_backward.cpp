// Dense backward of the CPU conv2d_relu_maxpool2d (plan: dense): the pooled gradient routed
// through the argmax into a dense conv-output gradient, then ATen's convolution_backward. Stock's
// arithmetic: taken for non-finite operands (whose NaN placement the sparse paths would change)
// and for shapes neither sparse path takes.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "lightnet_ops/cpu_conv_args.h"
#include "lightnet_ops/cpu_conv_paths.h"

namespace lightnet_ops {
namespace cpu {
namespace {

// Scatters the pooled gradient (N, K, PH, PW) through the argmax into the conv-output gradient
// (N, K, P, Q), writing every element of it (zeros where nothing routes), and, if plane_sums is
// not null, the sum of what each (n, k) plane received (the bias gradient before the sum over the
// batch). One pass per plane while it is in cache, instead of zero-fill, scatter and a separate
// reduction over the dense gradient. Planes are independent, so overlapping windows (pool stride
// < pool window) accumulate without races. Bytes outside the window (not written by the forward,
// e.g. an argmax from another pool configuration) route nothing instead of writing out of bounds.
template <typename scalar_t>
void route_grad(const ConvPoolShape& s, const scalar_t* grad_out, const uint8_t* argmax, scalar_t* grad_conv,
                scalar_t* plane_sums) {
  // Offset of each argmax byte's position from its window's corner in the conv-output plane, -1
  // for bytes that route nothing.
  const ArgmaxOffsets window(s);
  int64_t offset[256];
  for (int a = 0; a < 256; ++a) offset[a] = window.dy[a] < 0 ? -1 : window.dy[a] * s.Q + window.dx[a];
  at::parallel_for(0, s.N * s.K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* g = grad_out + plane * s.PH * s.PW;
      const uint8_t* am = argmax + plane * s.PH * s.PW;
      scalar_t* dst = grad_conv + plane * s.P * s.Q;
      std::fill(dst, dst + s.P * s.Q, scalar_t(0));
      scalar_t sum = 0;
      for (int64_t ph = 0; ph < s.PH; ++ph) {
        for (int64_t pw = 0; pw < s.PW; ++pw) {
          const int64_t off = offset[am[ph * s.PW + pw]];
          if (off < 0) continue;
          const scalar_t v = g[ph * s.PW + pw];
          dst[ph * s.pool_sh * s.Q + pw * s.pool_sw + off] += v;
          sum += v;
        }
      }
      if (plane_sums != nullptr) plane_sums[plane] = sum;
    }
  });
}

}  // namespace

ConvGrads run_dense_backward(const ConvPoolShape& s, const at::Tensor& grad_output, const at::Tensor& input,
                             const at::Tensor& weight, const at::Tensor& argmax, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> mask) {
  const auto empty = [&] { return at::empty({0}, input.options()); };  // outputs must not alias
  auto grad_conv = at::empty({s.N, s.K, s.P, s.Q}, input.options());
  at::Tensor grad_input = empty(), grad_weight = empty(), grad_bias = empty();
  if (mask[2]) grad_bias = at::zeros({s.K}, input.options());
  if (grad_conv.numel() > 0) {
    const auto g = grad_output.contiguous();
    const auto am = argmax.contiguous();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_backward_cpu", [&] {
      std::vector<scalar_t> plane_sums(mask[2] ? s.N * s.K : 0);
      route_grad<scalar_t>(s, g.const_data_ptr<scalar_t>(), am.const_data_ptr<uint8_t>(),
                           grad_conv.mutable_data_ptr<scalar_t>(), mask[2] ? plane_sums.data() : nullptr);
      if (mask[2]) add_plane_sums_in_batch_order(s, plane_sums, grad_bias.mutable_data_ptr<scalar_t>());
    });
  }
  if (mask[0] || mask[1]) {
    auto grads = at::convolution_backward(grad_conv, input, weight, c10::nullopt, stride, padding, dilation, false,
                                          {0, 0}, 1, {mask[0], mask[1], false});
    if (mask[0]) grad_input = std::get<0>(grads);
    if (mask[1]) grad_weight = std::get<1>(grads);
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace lightnet_ops

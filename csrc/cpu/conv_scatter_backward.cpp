// ATen-path backward of the CPU conv2d_relu_maxpool2d by the scatter kernels (plan: scatter).
// The routed conv-output gradient has at most one nonzero per pool window, yet a dense
// convolution_backward multiplies all of it; this backward works from the live pooled elements
// only: grad_weight row k sums gradient * input patch over plane k's live elements, grad_input
// adds gradient * filter k into the patch each one read. Channels-last, vectorised over input
// channels. Deterministic: each grad_weight row and each sample's grad_input is summed by one
// thread in a fixed order.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "lightnet_ops/cpu_conv_args.h"
#include "lightnet_ops/cpu_conv_paths.h"
#include "lightnet_ops/cpu_simd.h"

#if LIGHTNET_OPS_X86_DISPATCH
#include <immintrin.h>  // intrinsics used only inside the AVX2 / AVX-512 target regions
#endif

#define LIGHTNET_OPS_KERNELS_HEADER "lightnet_ops/cpu_conv_span_kernels.h"
#include "lightnet_ops/cpu_isa_variants.h"

namespace lightnet_ops {
namespace cpu {
namespace {

template <typename T>
struct ScatterKernels {
  void (*grad_weight)(const ScatterArgs<T>&, int64_t, int64_t);  // over output channels
  void (*grad_input)(const ScatterArgs<T>&, int64_t, int64_t);   // over samples
};

template <typename T>
ScatterKernels<T> scatter_kernels(Isa isa) {
#if LIGHTNET_OPS_X86_DISPATCH
  if (isa == Isa::kAvx512) return {&isa_avx512::scatter_grad_weight_range<T>, &isa_avx512::scatter_grad_input_range<T>};
  if (isa == Isa::kAvx2) return {&isa_avx2::scatter_grad_weight_range<T>, &isa_avx2::scatter_grad_input_range<T>};
#endif
  (void)isa;
  return {&isa_default::scatter_grad_weight_range<T>, &isa_default::scatter_grad_input_range<T>};
}

template <typename T>
void scatter_backward(const ConvPoolShape& s, Isa isa, const at::Tensor& grad_out, const at::Tensor& input,
                      const at::Tensor& weight, const at::Tensor& argmax, std::array<bool, 3> mask,
                      at::Tensor& grad_input, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const SpanGeometry g(s, sizeof(T));
  const int64_t slack = 64 / int64_t(sizeof(T));  // room for the last vector of a span to run over
  const int64_t sample = g.Hp * g.Wp * s.C;
  at::Tensor x_t;
  if (mask[1]) {
    x_t = at::empty({s.N * sample + slack}, input.options());
    const at::Tensor image = x_t.narrow(0, 0, s.N * sample).view({s.N, g.Hp, g.Wp, s.C});
    if (s.pad_h > 0 || s.pad_w > 0) image.zero_();
    x_t.narrow(0, s.N * sample, slack).zero_();
    image.narrow(1, s.pad_h, s.H).narrow(2, s.pad_w, s.W).copy_(input.permute({0, 2, 3, 1}));
  }
  at::Tensor w_t;
  if (mask[0]) {
    w_t = at::zeros({s.K, s.R, g.Lp}, input.options());
    g.taps(w_t, s).copy_(weight.permute({0, 2, 3, 1}));
  }
  const int64_t gi_stride = sample + slack;
  at::Tensor gi_t = mask[0] ? at::empty({s.N, gi_stride}, input.options()) : at::Tensor();
  // The kernel writes every grad_weight element once it has a sample; an empty batch gets zeros.
  at::Tensor gw_t = mask[1] ? (s.N > 0 ? at::empty({s.K, s.R, g.Lp}, input.options())
                                       : at::zeros({s.K, s.R, g.Lp}, input.options()))
                            : at::Tensor();
  const ArgmaxOffsets offsets(s);
  const ScatterArgs<T> a{&s,
                         g.Ls,
                         g.Lp,
                         g.Wp * s.C,
                         mask[1] ? x_t.const_data_ptr<T>() : nullptr,
                         mask[0] ? w_t.const_data_ptr<T>() : nullptr,
                         grad_out.const_data_ptr<T>(),
                         argmax.const_data_ptr<uint8_t>(),
                         mask[0] ? gi_t.mutable_data_ptr<T>() : nullptr,
                         gi_stride,
                         mask[1] ? gw_t.mutable_data_ptr<T>() : nullptr,
                         &offsets};
  const ScatterKernels<T> kern = scatter_kernels<T>(isa);
  // Rows of grad_weight (one thread each, fixed order) and samples of grad_input: the result does
  // not depend on the number of threads.
  if (mask[1]) at::parallel_for(0, s.K, 1, [&](int64_t k0, int64_t k1) { kern.grad_weight(a, k0, k1); });
  if (mask[0]) at::parallel_for(0, s.N, 1, [&](int64_t n0, int64_t n1) { kern.grad_input(a, n0, n1); });
  if (mask[0]) {
    grad_input = gi_t.narrow(1, 0, sample)
                     .view({s.N, g.Hp, g.Wp, s.C})
                     .narrow(1, s.pad_h, s.H)
                     .narrow(2, s.pad_w, s.W)
                     .permute({0, 3, 1, 2})
                     .contiguous();
  }
  if (mask[1]) grad_weight = g.taps(gw_t, s).permute({0, 3, 1, 2}).contiguous();
  if (mask[2]) {
    // Per plane in position order, then over the batch in order (the dense path's order).
    std::vector<T> plane_sums(s.N * s.K);
    const int64_t F = s.PH * s.PW;
    at::parallel_for(0, s.N * s.K, 16, [&](int64_t p0, int64_t p1) {
      for (int64_t plane = p0; plane < p1; ++plane) {
        const T* g = grad_out.const_data_ptr<T>() + plane * F;
        const uint8_t* am = argmax.const_data_ptr<uint8_t>() + plane * F;
        T sum = 0;
        for (int64_t f = 0; f < F; ++f) {
          if (offsets.dy[am[f]] >= 0) sum += g[f];  // live elements only
        }
        plane_sums[plane] = sum;
      }
    });
    add_plane_sums_in_batch_order(s, plane_sums, grad_bias.mutable_data_ptr<T>());
  }
}

}  // namespace

ConvGrads run_scatter_backward(const ConvPoolShape& s, const ConvBackwardPlan& plan, const at::Tensor& grad_output,
                               const at::Tensor& input, const at::Tensor& weight, const at::Tensor& argmax,
                               std::array<bool, 3> mask) {
  const auto empty = [&] { return at::empty({0}, input.options()); };  // outputs must not alias
  at::Tensor grad_input = empty(), grad_weight = empty();
  at::Tensor grad_bias = mask[2] ? at::zeros({s.K}, input.options()) : empty();
  const auto g = grad_output.contiguous();
  const auto am = argmax.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_backward_cpu_scatter", [&] {
    scatter_backward<scalar_t>(s, plan.isa, g, input, weight, am, mask, grad_input, grad_weight, grad_bias);
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace lightnet_ops

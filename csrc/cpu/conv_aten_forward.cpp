// ATen-path forward of the CPU conv2d_relu_maxpool2d (plan: aten-conv, and aten-winograd's
// fallback): ATen's convolution in batch chunks, each pooled by one fused pass. Also the
// vectorised finite scan the plan uses. See cpu_conv_paths.h.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "lightnet_ops/cpu_conv_args.h"
#include "lightnet_ops/cpu_conv_paths.h"
#include "lightnet_ops/cpu_simd.h"

#if LIGHTNET_OPS_X86_DISPATCH
#include <immintrin.h>  // intrinsics used only inside the AVX2 / AVX-512 target regions
#endif

#define LIGHTNET_OPS_KERNELS_HEADER "lightnet_ops/cpu_conv_pool_kernels.h"
#include "lightnet_ops/cpu_isa_variants.h"

namespace lightnet_ops {
namespace cpu {
namespace {

template <typename T>
using PoolFn = void (*)(const PoolArgs<T>&, int64_t, int64_t);
template <typename T>
using FiniteFn = bool (*)(const T*, int64_t);

template <typename T>
PoolFn<T> pool_kernel(Isa isa) {
#if LIGHTNET_OPS_X86_DISPATCH
  if (isa == Isa::kAvx512) return &isa_avx512::bias_relu_pool_range<T>;
  if (isa == Isa::kAvx2) return &isa_avx2::bias_relu_pool_range<T>;
#endif
  (void)isa;
  return &isa_default::bias_relu_pool_range<T>;
}

template <typename T>
FiniteFn<T> finite_kernel(Isa isa) {
#if LIGHTNET_OPS_X86_DISPATCH
  if (isa == Isa::kAvx512) return &isa_avx512::all_finite<T>;
  if (isa == Isa::kAvx2) return &isa_avx2::all_finite<T>;
#endif
  (void)isa;
  return &isa_default::all_finite<T>;
}

}  // namespace

bool tensor_is_finite(const at::Tensor& t, Isa isa) {
  std::atomic<bool> finite{true};
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "conv2d_relu_maxpool2d_all_finite", [&] {
    const auto c = t.contiguous();
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    const FiniteFn<scalar_t> fn = finite_kernel<scalar_t>(isa);
    at::parallel_for(0, c.numel(), 1 << 16, [&](int64_t b, int64_t e) {
      if (!fn(p + b, e - b)) finite = false;
    });
  });
  return finite;
}

void run_aten_conv_forward(const ConvPoolShape& s, const ConvForwardPlan& plan, const at::Tensor& input,
                           const at::Tensor& weight, const at::Tensor& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, at::Tensor& out, at::Tensor& argmax,
                           bool need_argmax) {
  const int64_t per_chunk = plan.chunk;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_cpu", [&] {
    const PoolFn<scalar_t> fn = pool_kernel<scalar_t>(plan.isa);
    for (int64_t n0 = 0; n0 < s.N; n0 += per_chunk) {
      ConvPoolShape cs = s;
      cs.N = std::min(per_chunk, s.N - n0);
      const auto conv = at::convolution(input.narrow(0, n0, cs.N), weight, c10::nullopt, stride, padding, dilation,
                                        false, {0, 0}, 1)
                            .contiguous();
      const int64_t first = n0 * s.K * s.PH * s.PW;  // first pooled element of the chunk
      const PoolArgs<scalar_t> a{&cs, conv.const_data_ptr<scalar_t>(),
                                 bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                 out.mutable_data_ptr<scalar_t>() + first,
                                 need_argmax ? argmax.mutable_data_ptr<uint8_t>() + first : nullptr};
      at::parallel_for(0, cs.N * s.K, 1, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
    }
  });
}

}  // namespace cpu
}  // namespace lightnet_ops

// Direct-path forward of the CPU conv2d_relu_maxpool2d (plan: direct, direct-winograd). See
// run_direct_forward in cpu_conv_paths.h.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

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

#define LIGHTNET_OPS_KERNELS_HEADER "lightnet_ops/cpu_conv_winograd_kernels.h"
#define LIGHTNET_OPS_KERNELS_HEADER2 "lightnet_ops/cpu_conv_direct_kernels.h"
#include "lightnet_ops/cpu_isa_variants.h"

namespace lightnet_ops {
namespace cpu {
namespace {

template <typename T>
using FwdFn = void (*)(const DirectFwdArgs<T>&, int64_t, int64_t);

// The direct forward and its Winograd variant for this instruction set and channel block (the
// plan's: 8 or 6 on AVX-512, else 4).
template <typename T>
std::pair<FwdFn<T>, FwdFn<T>> forward_kernels(Isa isa, int64_t KB) {
#if LIGHTNET_OPS_X86_DISPATCH
  if (isa == Isa::kAvx512 && KB == 8) {
    return {&isa_avx512::direct_forward_range<T, 8>, &isa_avx512::direct_winograd_forward_range<T, 8>};
  }
  if (isa == Isa::kAvx512 && KB == 6) {
    return {&isa_avx512::direct_forward_range<T, 6>, &isa_avx512::direct_winograd_forward_range<T, 6>};
  }
  if (isa == Isa::kAvx2 && KB == 4) {
    return {&isa_avx2::direct_forward_range<T, 4>, &isa_avx2::direct_winograd_forward_range<T, 4>};
  }
#endif
  TORCH_INTERNAL_ASSERT(KB == 4, "no direct forward kernel for channel block ", KB, " on ", isa_name(isa));
  return {&isa_default::direct_forward_range<T, 4>, &isa_default::direct_winograd_forward_range<T, 4>};
}

template <typename T>
ConvForwardRun direct_forward_launch(const ConvPoolShape& s, const ConvForwardPlan& plan, const at::Tensor& input,
                                     const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out,
                                     at::Tensor& argmax, bool need_argmax) {
  ConvForwardRun run{plan, plan.path, 0};
  const std::shared_ptr<const Direct> geometry = cached_direct(s, plan.channel_block);
  const Direct& d = *geometry;
  std::vector<T> wpk(d.Kpad * d.CRS), bpk(d.Kpad);
  pack_weight<T>(d, weight.const_data_ptr<T>(), bias.defined() ? bias.const_data_ptr<T>() : nullptr, wpk.data(),
                 bpk.data());
  std::atomic<int64_t> fallback_samples{0};
  DirectFwdArgs<T> a{&d, input.const_data_ptr<T>(), wpk.data(), bpk.data(), out.mutable_data_ptr<T>(),
                     need_argmax ? argmax.mutable_data_ptr<uint8_t>() : nullptr};
  const auto [direct_fn, winograd_fn] = forward_kernels<T>(plan.isa, d.KB);
  FwdFn<T> fn = direct_fn;
  // The weights are finite (the plan checked); their transform can still overflow: then the whole
  // call takes the direct kernel.
  const std::vector<T> wino_u =
      plan.path == ConvForward::kDirectWinograd ? direct_winograd_weights<T>(s, weight) : std::vector<T>();
  if (!wino_u.empty()) {
    a.wino_u = wino_u.data();
    a.bias = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
    a.fallback_samples = &fallback_samples;
    fn = winograd_fn;
  } else {
    run.ran = ConvForward::kDirect;
  }
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  run.fallback_samples = fallback_samples.load();
  return run;
}

}  // namespace

ConvForwardRun run_direct_forward(const ConvPoolShape& s, const ConvForwardPlan& plan, const at::Tensor& input,
                                  const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out, at::Tensor& argmax,
                                  bool need_argmax) {
  ConvForwardRun run;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_cpu_direct", [&] {
    run = direct_forward_launch<scalar_t>(s, plan, input, weight, bias, out, argmax, need_argmax);
  });
  return run;
}

}  // namespace cpu
}  // namespace lightnet_ops

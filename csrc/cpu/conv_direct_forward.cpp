// Direct-path forward of the CPU conv2d_relu_maxpool2d (plan: direct, direct-winograd). See
// run_direct_forward in cpu_conv_paths.h.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
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

// A prepared call's state: the packed weights and the kernel; DirectForward::run reads it from any
// thread while the samples run.
template <typename T>
struct DirectForwardState {
  std::shared_ptr<const Direct> geometry;
  std::vector<T> wpk, bpk, wino_u;
  std::atomic<int64_t> fallback_samples{0};
  DirectFwdArgs<T> args{};
  FwdFn<T> fn = nullptr;
};

template <typename T>
std::shared_ptr<DirectForwardState<T>> prepare(const ConvPoolShape& s, const ConvForwardPlan& plan,
                                               const at::Tensor& input, const at::Tensor& weight,
                                               const at::Tensor& bias, at::Tensor& out, at::Tensor& argmax,
                                               bool need_argmax, ConvForwardRun& run) {
  auto st = std::make_shared<DirectForwardState<T>>();
  st->geometry = cached_direct(s, plan.channel_block);
  const Direct& d = *st->geometry;
  st->wpk.resize(d.Kpad * d.CRS);
  st->bpk.resize(d.Kpad);
  pack_weight<T>(d, weight.const_data_ptr<T>(), bias.defined() ? bias.const_data_ptr<T>() : nullptr, st->wpk.data(),
                 st->bpk.data());
  st->args = DirectFwdArgs<T>{&d, input.const_data_ptr<T>(), st->wpk.data(), st->bpk.data(), out.mutable_data_ptr<T>(),
                              need_argmax ? argmax.mutable_data_ptr<uint8_t>() : nullptr};
  const auto [direct_fn, winograd_fn] = forward_kernels<T>(plan.isa, d.KB);
  st->fn = direct_fn;
  // The weights are finite (the plan checked); their transform can still overflow: then the whole
  // call takes the direct kernel.
  if (plan.path == ConvForward::kDirectWinograd) st->wino_u = direct_winograd_weights<T>(s, weight);
  if (!st->wino_u.empty()) {
    st->args.wino_u = st->wino_u.data();
    st->args.bias = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
    st->args.fallback_samples = &st->fallback_samples;
    st->fn = winograd_fn;
  } else {
    run.ran = ConvForward::kDirect;
  }
  return st;
}

}  // namespace

DirectForward::DirectForward(const ConvPoolShape& s, const ConvForwardPlan& plan, const at::Tensor& input,
                             const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out, at::Tensor& argmax,
                             bool need_argmax)
    : run_{plan, plan.path, 0} {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_cpu_direct", [&] {
    auto st = prepare<scalar_t>(s, plan, input, weight, bias, out, argmax, need_argmax, run_);
    samples_ = [st](int64_t begin, int64_t end) { st->fn(st->args, begin, end); };
    fallback_samples_ = [st] { return st->fallback_samples.load(); };
  });
}

ConvForwardRun DirectForward::result() const {
  ConvForwardRun run = run_;
  run.fallback_samples = fallback_samples_();
  return run;
}

ConvForwardRun run_direct_forward(const ConvPoolShape& s, const ConvForwardPlan& plan, const at::Tensor& input,
                                  const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out, at::Tensor& argmax,
                                  bool need_argmax) {
  const DirectForward forward(s, plan, input, weight, bias, out, argmax, need_argmax);
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) { forward.run(begin, end); });
  return forward.result();
}

}  // namespace cpu
}  // namespace lightnet_ops

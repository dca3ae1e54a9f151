// Direct-path forward of the CPU conv2d_relu_maxpool2d (plan: direct, direct-winograd). See
// run_direct_forward in cpu_conv_paths.h.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
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

// One layer's weights as the kernels read them: the direct kernel's [Kpad / KB][C * R * S][KB]
// weights and [Kpad] bias, and for the Winograd variant the transformed weights (empty if a
// transformed value overflowed: the call then takes the direct kernel).
template <typename T>
struct PackedWeights {
  std::vector<T> wpk, bpk, wino_u;
};

// Weights of at most this many elements are kept in packed_weights' cache (LightNet's conv2 has
// 864). An entry holds their copy and packed forms, about four times the weights: at most about
// 0.5 MiB per entry (float64), 2 MiB per thread and dtype.
constexpr int64_t kMaxCachedWeights = int64_t(1) << 14;

// The packed weights of a call, from a small per-thread cache: packing and the Winograd transform
// cost about a microsecond per layer, as much as a batch-1 kernel of a small layer, and inference
// calls them with the same weights every time. An entry is reused only where the shape, channel
// block and variant match and every byte of the weight and bias equals the entry's copy of them,
// so any change to the values (an optimizer step, an in-place edit through .data, which a version
// counter would not see) packs afresh. Four entries, as cached_direct.
template <typename T>
std::shared_ptr<const PackedWeights<T>> packed_weights(const ConvPoolShape& s, const Direct& d, bool winograd,
                                                       const at::Tensor& weight, const at::Tensor& bias) {
  const T* w = weight.const_data_ptr<T>();
  const T* b = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  const int64_t wn = d.K * d.CRS, bn = b != nullptr ? d.K : 0;
  const auto pack = [&] {
    auto p = std::make_shared<PackedWeights<T>>();
    p->wpk.resize(d.Kpad * d.CRS);
    p->bpk.resize(d.Kpad);
    pack_weight<T>(d, w, b, p->wpk.data(), p->bpk.data());
    if (winograd) p->wino_u = direct_winograd_weights<T>(s, weight);
    return std::shared_ptr<const PackedWeights<T>>(std::move(p));
  };
  if (wn > kMaxCachedWeights) return pack();
  struct Entry {
    ConvPoolShape key;
    int64_t KB = 0;
    bool winograd = false;
    std::vector<T> values;  // the weight's elements, then the bias's
    int64_t bias_elems = 0;
    std::shared_ptr<const PackedWeights<T>> packed;
  };
  thread_local std::array<Entry, 4> entries;
  thread_local size_t next = 0;
  ConvPoolShape key = s;
  key.N = 0;
  const auto same_values = [&](const Entry& e) {
    return e.bias_elems == bn && static_cast<int64_t>(e.values.size()) == wn + bn &&
           std::memcmp(e.values.data(), w, wn * sizeof(T)) == 0 &&
           (bn == 0 || std::memcmp(e.values.data() + wn, b, bn * sizeof(T)) == 0);
  };
  for (const Entry& e : entries) {
    if (e.packed && e.KB == d.KB && e.winograd == winograd && std::memcmp(&e.key, &key, sizeof(key)) == 0 &&
        same_values(e)) {
      return e.packed;
    }
  }
  Entry& e = entries[next];
  next = (next + 1) % entries.size();
  e = Entry{key, d.KB, winograd, std::vector<T>(w, w + wn), bn, pack()};
  if (bn > 0) e.values.insert(e.values.end(), b, b + bn);
  return e.packed;
}

// A prepared call's state: the packed weights and the kernel; DirectForward::run reads it from any
// thread while the samples run.
template <typename T>
struct DirectForwardState {
  std::shared_ptr<const Direct> geometry;
  std::shared_ptr<const PackedWeights<T>> packed;
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
  // The weights are finite (the plan checked); their Winograd transform can still overflow: then
  // the whole call takes the direct kernel.
  st->packed = packed_weights<T>(s, d, plan.path == ConvForward::kDirectWinograd, weight, bias);
  const PackedWeights<T>& p = *st->packed;
  st->args = DirectFwdArgs<T>{&d, input.const_data_ptr<T>(), p.wpk.data(), p.bpk.data(), out.mutable_data_ptr<T>(),
                              need_argmax ? argmax.mutable_data_ptr<uint8_t>() : nullptr};
  const auto [direct_fn, winograd_fn] = forward_kernels<T>(plan.isa, d.KB);
  st->fn = direct_fn;
  if (!p.wino_u.empty()) {
    st->args.wino_u = p.wino_u.data();
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

// Direct-path backward of the CPU conv2d_relu_maxpool2d (plan: direct), with its grad_input by
// the direct kernel or the Winograd adjoint and its grad_weight by the direct or the span kernel.
// See run_direct_backward in cpu_conv_paths.h.
//
// Deterministic: the weight and bias gradients are accumulated in per-chunk partial sums over a
// fixed split of the batch (independent of the thread count), reduced in chunk order.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "lightnet_ops/cpu_conv_args.h"
#include "lightnet_ops/cpu_conv_paths.h"
#include "lightnet_ops/cpu_simd.h"

#if LIGHTNET_OPS_X86_DISPATCH
#include <immintrin.h>  // intrinsics used only inside the AVX2 / AVX-512 target regions
#endif

#define LIGHTNET_OPS_KERNELS_HEADER "lightnet_ops/cpu_conv_winograd_kernels.h"
#define LIGHTNET_OPS_KERNELS_HEADER2 "lightnet_ops/cpu_conv_direct_kernels.h"
#define LIGHTNET_OPS_KERNELS_HEADER3 "lightnet_ops/cpu_conv_span_kernels.h"
#include "lightnet_ops/cpu_isa_variants.h"

namespace lightnet_ops {
namespace cpu {
namespace {

template <typename T>
using BwdFn = void (*)(const DirectBwdArgs<T>&, int64_t, int64_t, T*, T*);
template <typename T>
using SpanGwFn = void (*)(const SpanGradWeightArgs<T>&, int64_t, int64_t, T*);

// The direct backward for this instruction set and channel block (the plan's: 6 or 8 on AVX-512,
// else 4).
template <typename T>
BwdFn<T> backward_kernel(Isa isa, int64_t KB) {
#if LIGHTNET_OPS_X86_DISPATCH
  if (isa == Isa::kAvx512 && KB == 8) return &isa_avx512::direct_backward_range<T, 8>;
  if (isa == Isa::kAvx512 && KB == 6) return &isa_avx512::direct_backward_range<T, 6>;
  if (isa == Isa::kAvx2 && KB == 4) return &isa_avx2::direct_backward_range<T, 4>;
#endif
  TORCH_INTERNAL_ASSERT(KB == 4, "no direct backward kernel for channel block ", KB, " on ", isa_name(isa));
  return &isa_default::direct_backward_range<T, 4>;
}

template <typename T>
SpanGwFn<T> span_kernel(Isa isa) {
#if LIGHTNET_OPS_X86_DISPATCH
  if (isa == Isa::kAvx512) return &isa_avx512::span_grad_weight_range<T>;
  if (isa == Isa::kAvx2) return &isa_avx2::span_grad_weight_range<T>;
#endif
  (void)isa;
  return &isa_default::span_grad_weight_range<T>;
}

// grad_weight of the direct path through the span kernel (use_span_grad_weight): per sample,
// every live pooled element adds gradient * the spans of the conv position it selected (one
// vector per span slice instead of the direct kernel's sweep over every window offset). Runs per
// chunk of direct_backward_launch's fixed split of the batch, inside its parallel region (the
// chunk's samples are still in cache from the direct kernel); partial sums per chunk, reduced in
// chunk order: independent of the thread count.
template <typename T>
class SpanGradWeight {
 public:
  SpanGradWeight(const ConvPoolShape& s, const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& argmax,
                 int64_t chunks, Isa isa)
      : s_(s), geo_(s, sizeof(T)), pos_base_(s.PH * s.PW) {
    // The span-row offset of the conv position that pooled position f selects with window offset
    // w is linear in both: pos_base[f] (the window's first position) + byte_off[w].
    const int64_t Xn = geo_.Wp - geo_.Sd + 1;
    const ArgmaxOffsets offsets(s);
    for (int64_t ph = 0; ph < s.PH; ++ph)
      for (int64_t pw = 0; pw < s.PW; ++pw)
        pos_base_[ph * s.PW + pw] = (ph * s.pool_sh * s.stride_h * Xn + pw * s.pool_sw * s.stride_w) * geo_.Lp;
    for (int b = 0; b < 256; ++b) {
      byte_live_[b] = offsets.dy[b] >= 0;
      byte_off_[b] = byte_live_[b] ? (offsets.dy[b] * s.stride_h * Xn + offsets.dx[b] * s.stride_w) * geo_.Lp : 0;
    }
    args_ = SpanGradWeightArgs<T>{&s_,
                                       geo_.Ls,
                                       geo_.Lp,
                                       Xn,
                                       input.const_data_ptr<T>(),
                                       grad_out.const_data_ptr<T>(),
                                       argmax.const_data_ptr<uint8_t>(),
                                       pos_base_.data(),
                                       byte_off_,
                                       byte_live_};
    fn_ = span_kernel<T>(isa);
    part_ = s.K * s.R * geo_.Lp;
    partial_ = at::zeros({chunks, part_}, input.options());
  }
  SpanGradWeight(const SpanGradWeight&) = delete;  // args_ points into the members
  SpanGradWeight& operator=(const SpanGradWeight&) = delete;

  void run_chunk(int64_t ch, int64_t n0, int64_t n1) {
    if (n0 < n1) fn_(args_, n0, n1, partial_.mutable_data_ptr<T>() + ch * part_);
  }

  // Chunk 0 accumulates the others, in chunk order; then the taps' columns of the spans: weight
  // (k, c, r, q) is span (k, r) at column q * dil_w, channel c (a plain loop: the equivalent
  // view / slice / permute / copy_ chain cost more in ATen dispatch than the copy itself).
  void finish(at::Tensor& grad_weight) {
    T* sums = partial_.mutable_data_ptr<T>();
    for (int64_t ch = 1; ch < partial_.size(0); ++ch) {
      const T* src = sums + ch * part_;
      for (int64_t i = 0; i < part_; ++i) sums[i] += src[i];
    }
    TORCH_INTERNAL_ASSERT(grad_weight.is_contiguous());
    T* gw = grad_weight.mutable_data_ptr<T>();
    for (int64_t k = 0; k < s_.K; ++k)
      for (int64_t c = 0; c < s_.C; ++c)
        for (int64_t r = 0; r < s_.R; ++r)
          for (int64_t q = 0; q < s_.S; ++q)
            *gw++ = sums[(k * s_.R + r) * geo_.Lp + q * s_.dil_w * s_.C + c];
  }

 private:
  const ConvPoolShape s_;
  const SpanGeometry geo_;
  std::vector<int64_t> pos_base_;
  int64_t byte_off_[256], byte_live_[256];
  SpanGradWeightArgs<T> args_{};
  SpanGwFn<T> fn_ = nullptr;
  int64_t part_ = 0;
  at::Tensor partial_;
};

template <typename T>
void direct_backward_launch(const ConvPoolShape& s, const ConvBackwardPlan& plan, const at::Tensor& grad_out,
                            const at::Tensor& input, const at::Tensor& weight, const at::Tensor& argmax,
                            std::array<bool, 3> mask, at::Tensor& grad_input, at::Tensor& grad_weight,
                            at::Tensor& grad_bias, ConvBackwardRun& run) {
  const Isa isa = plan.isa;
  const bool span_weight = mask[1] && plan.weight_grad == WeightGrad::kSpan;
  const std::shared_ptr<const Direct> geometry = cached_direct(s, plan.channel_block);
  const Direct& d = *geometry;
  std::vector<T> wpk(d.Kpad * d.CRS);
  pack_weight<T>(d, weight.const_data_ptr<T>(), nullptr, wpk.data(), nullptr);
  // Empty (the direct grad_input) unless the Winograd one is planned and its weights are finite.
  const std::vector<T> wino_u = mask[0] && plan.input_grad == InputGrad::kWinograd
                                    ? direct_winograd_weights<T>(s, weight)
                                    : std::vector<T>();
  run.input_grad = !mask[0] ? InputGrad::kNone : wino_u.empty() ? InputGrad::kDirect : InputGrad::kWinograd;
  std::atomic<int64_t> fallback_samples{0};
  // A fixed split of the batch into chunks (a function of the shapes only): the partial weight /
  // bias gradients, kept per lane and reduced in lane then chunk order, do not depend on the number
  // of threads. Up to 16 chunks (enough to balance a few cores), fewer when the partials get large.
  if (span_weight) mask[1] = false;  // grad_weight from SpanGradWeight, the rest from the direct kernel
  const bool need_w = mask[1], need_b = mask[2], need_direct = mask[0] || mask[1] || mask[2];
  const int64_t part = ((need_w ? d.Kpad * d.CRS : 0) + (need_b ? d.Kpad : 0)) * kPartialLanes;
  const int64_t budget = std::max<int64_t>(1, (int64_t(64) << 20) / std::max<int64_t>(1, part * int64_t(sizeof(T))));
  const int64_t chunks = std::max<int64_t>(1, std::min({s.N, int64_t(16), budget}));
  const int64_t per_chunk = (s.N + chunks - 1) / chunks;
  const int64_t gw_stride = d.Kpad * d.CRS * kPartialLanes, gb_stride = d.Kpad * kPartialLanes;
  const int64_t gw_entries = s.K * d.CRS, gb_entries = s.K;
  // Per-lane partials (uninitialised; each chunk zeroes its own slice, in parallel and while it
  // is about to be used) and their per-chunk lane sums. The partials come from PyTorch's allocator
  // so that memory profiling sees them (about 1 MiB for LightNet's conv2 at batch 64).
  const at::Tensor gw_part = at::empty({need_w ? chunks * gw_stride : 0}, input.options());
  const at::Tensor gb_part = at::empty({need_b ? chunks * gb_stride : 0}, input.options());
  std::vector<T> gw_chunk(need_w ? chunks * gw_entries : 0), gb_chunk(need_b ? chunks * gb_entries : 0);
  std::optional<SpanGradWeight<T>> span;
  if (span_weight) span.emplace(s, grad_out, input, argmax, chunks, isa);
  const DirectBwdArgs<T> a{&d,
                           input.const_data_ptr<T>(),
                           wpk.data(),
                           grad_out.const_data_ptr<T>(),
                           argmax.const_data_ptr<uint8_t>(),
                           mask[0] ? grad_input.mutable_data_ptr<T>() : nullptr,
                           need_w,
                           need_b,
                           wino_u.empty() ? nullptr : wino_u.data(),
                           &fallback_samples};
  const BwdFn<T> fn = backward_kernel<T>(isa, d.KB);
  // Lane sums in lane order, per chunk (inside the parallel region: the slice is still in cache).
  const auto sum_lanes = [](const T* part_sums, int64_t entries, T* dst) {
    for (int64_t i = 0; i < entries; ++i) {
      const T* lanes = part_sums + i * kPartialLanes;
      T sum = lanes[0];
      for (int64_t l = 1; l < kPartialLanes; ++l) sum += lanes[l];
      dst[i] = sum;
    }
  };
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t n0 = ch * per_chunk, n1 = std::min(s.N, n0 + per_chunk);
      T* gw = need_w ? gw_part.mutable_data_ptr<T>() + ch * gw_stride : nullptr;
      T* gb = need_b ? gb_part.mutable_data_ptr<T>() + ch * gb_stride : nullptr;
      if (gw) std::fill(gw, gw + gw_stride, T(0));
      if (gb) std::fill(gb, gb + gb_stride, T(0));
      if (n0 < n1 && need_direct) fn(a, n0, n1, gw, gb);
      if (gw) sum_lanes(gw, gw_entries, gw_chunk.data() + ch * gw_entries);
      if (gb) sum_lanes(gb, gb_entries, gb_chunk.data() + ch * gb_entries);
      if (span) span->run_chunk(ch, n0, n1);
    }
  });
  if (span) span->finish(grad_weight);
  // Chunk order: the result does not depend on the number of threads.
  const auto reduce = [&](const std::vector<T>& chunk_sums, int64_t entries, T* dst) {
    for (int64_t ch = 0; ch < chunks; ++ch) {
      for (int64_t i = 0; i < entries; ++i) dst[i] += chunk_sums[ch * entries + i];
    }
  };
  if (need_w) reduce(gw_chunk, gw_entries, grad_weight.mutable_data_ptr<T>());
  if (need_b) reduce(gb_chunk, gb_entries, grad_bias.mutable_data_ptr<T>());
  run.fallback_samples = fallback_samples.load();
}

}  // namespace

ConvGrads run_direct_backward(const ConvPoolShape& s, const ConvBackwardPlan& plan, const at::Tensor& grad_output,
                              const at::Tensor& input, const at::Tensor& weight, const at::Tensor& argmax,
                              std::array<bool, 3> mask, ConvBackwardRun& run) {
  const auto empty = [&] { return at::empty({0}, input.options()); };  // outputs must not alias
  // grad_weight / grad_bias are accumulated into, so they start at zero (this also covers an
  // empty batch); the kernel zeroes each sample's grad_input before writing it.
  at::Tensor grad_input = mask[0] ? at::empty({s.N, s.C, s.H, s.W}, input.options()) : empty();
  at::Tensor grad_weight = mask[1] ? at::zeros({s.K, s.C, s.R, s.S}, input.options()) : empty();
  at::Tensor grad_bias = mask[2] ? at::zeros({s.K}, input.options()) : empty();
  run.input_grad = mask[0] ? (plan.input_grad == InputGrad::kWinograd ? InputGrad::kWinograd : InputGrad::kDirect)
                           : InputGrad::kNone;
  if (s.N > 0 && (mask[0] || mask[1] || mask[2])) {
    const auto g = grad_output.contiguous();
    const auto am = argmax.contiguous();
    const auto x = input.contiguous();
    const auto w = weight.contiguous();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_backward_cpu_direct", [&] {
      direct_backward_launch<scalar_t>(s, plan, g, x, w, am, mask, grad_input, grad_weight, grad_bias, run);
    });
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace lightnet_ops

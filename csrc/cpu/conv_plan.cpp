// The planning unit of the CPU conv2d_relu_maxpool2d: every kernel choice, its override variable
// and the instruction set, in one place; and the debug ops that report plans (what a call would
// run, what the last call did run) so that tests can assert the kernel they meant to test ran.
//
// Overrides (read on every call, so that a test can switch them; anything else = the rule):
//   LIGHTNET_OPS_CPU_CONV_PATH=direct|aten           direct kernels or the ATen path
//   LIGHTNET_OPS_CPU_DIRECT_FORWARD=winograd|direct  direct path forward
//   LIGHTNET_OPS_CPU_DIRECT_INPUT_GRAD=winograd|direct   direct path grad_input
//   LIGHTNET_OPS_CPU_DIRECT_WEIGHT_GRAD=span|direct  direct path grad_weight
//   LIGHTNET_OPS_CPU_ATEN_FORWARD=winograd|conv      ATen path forward
//   LIGHTNET_OPS_CPU_ATEN_BACKWARD=scatter|dense     ATen path backward
//   LIGHTNET_OPS_CPU_ATEN_CHUNK=n                    samples per ATen-path convolution chunk
//   LIGHTNET_OPS_CPU_ISA=default|avx2|avx512         cap on the instruction set (cpu_simd.h)
// A forced path still needs a shape it can take: Winograd only for 3x3 filters, stride 1,
// dilation 1 and 2x2 / stride-2 pools; the direct path only where its packed input stays about
// the size of the padded input (direct_packing_fits). The debug ops say what was chosen.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>

#include "lightnet_ops/checks.h"
#include "lightnet_ops/cpu_conv_args.h"
#include "lightnet_ops/cpu_conv_paths.h"
#include "lightnet_ops/cpu_conv_plan.h"
#include "lightnet_ops/cpu_simd.h"

namespace lightnet_ops {
namespace cpu {
namespace {

bool winograd_geometry(const ConvPoolShape& s) {
  return s.R == 3 && s.S == 3 && s.stride_h == 1 && s.stride_w == 1 && s.dil_h == 1 && s.dil_w == 1 &&
         s.pool_kh == 2 && s.pool_kw == 2 && s.pool_sh == 2 && s.pool_sw == 2;
}

// Direct kernels or the ATen path, for the forward or the backward. The direct kernel spends
// C*R*S*KB multiply-adds per vector load but has no cache blocking over its packed input (about the
// padded input per sample) and recomputes overlapping pool windows (area / stride area times);
// oneDNN wins at large C*R*S, except with few input channels on a few (sample, output channel)
// planes, where the direct kernel's lower per-call cost pays for longer reductions.
bool use_direct(const ConvPoolShape& s, int64_t elem_size, bool forward) {
  if (!direct_packing_fits(s)) return false;  // even when forced: see direct_packing_fits
  if (const int forced = env_choice("LIGHTNET_OPS_CPU_CONV_PATH", "direct", "aten"); forced >= 0) return forced == 1;
  const int64_t pack_bytes = s.C * (s.H + 2 * s.pad_h + 16) * (s.W + 2 * s.pad_w) * elem_size;
  const double recompute =
      double(s.pool_kh * s.pool_kw) / double(std::min(s.pool_kh, s.pool_sh) * std::min(s.pool_kw, s.pool_sw));
  // Its vectors run along conv-output rows: under 8 columns most lanes idle, which oneDNN beats
  // from 16 input channels on (tiny images of a network's last stages), or from 256 output
  // channels when there are fewer samples than threads (the direct kernel runs a sample per thread).
  if (s.Q < 8 && (s.C >= 16 || (s.N < at::get_num_threads() && s.K >= 256))) return false;
  // The forward on at most 5 columns: oneDNN's batched convolution wins from 512 planes on (the
  // direct backward still wins there).
  if (forward && s.Q <= 5 && s.N * s.K >= 512) return false;
  const double max_work = s.C < 16 && s.N * s.K <= 32 ? 1024.0 : 256.0;
  return double(s.C * s.R * s.S) * recompute <= max_work && pack_bytes <= (1 << 20);
}

// Direct path's Winograd F(2x2, 3x3) variants (forward from 3 input channels, grad_input from 4):
// 16 multiply-adds per tile and channel pair instead of 36, plus transforms that only pay off
// with a few input channels.
bool use_direct_winograd(const ConvPoolShape& s, const char* override_variable, int64_t min_channels) {
  if (!winograd_geometry(s)) return false;
  if (const int forced = env_choice(override_variable, "winograd", "direct"); forced >= 0) return forced == 1;
  return s.C >= min_channels;
}

// Direct path's grad_weight by the span kernel: it multiplies only live elements, in whole
// vectors over each span (Lp lanes for Ls elements); the direct kernel multiplies every window
// offset's masked plane. Worth it when window area * Ls >= 2 * Lp.
bool use_span_grad_weight(const ConvPoolShape& s, int64_t elem_size) {
  if (const int forced = env_choice("LIGHTNET_OPS_CPU_DIRECT_WEIGHT_GRAD", "span", "direct"); forced >= 0) {
    return forced == 1;
  }
  const SpanGeometry g(s, elem_size);
  return s.pool_kh * s.pool_kw * g.Ls >= 2 * g.Lp;
}

// ATen path's forward by Winograd: vectorised over channels, so at least 64 bytes of input and
// output channels; and at least 4 * C output tiles (pooled elements) per batch, since the weight
// transform (C * K per call) does not shrink with the batch while the GEMM savings (tiles * C * K)
// do: with fewer tiles oneDNN's convolution is faster (benchmarks/results/NOTES.md; about 3 * C
// tiles, batch 1 64 -> 64 on 28x28 and batch 2 128 -> 128 on 28x28: 0.88-1.01x stock by
// Winograd, 1.01-1.30x by oneDNN on a 2-core Xeon).
bool use_aten_winograd(const ConvPoolShape& s, int64_t elem_size) {
  if (!winograd_geometry(s)) return false;
  if (const int forced = env_choice("LIGHTNET_OPS_CPU_ATEN_FORWARD", "winograd", "conv"); forced >= 0) {
    return forced == 1;
  }
  return s.C * elem_size >= 64 && s.K * elem_size >= 64 && s.N * s.PH * s.PW >= 4 * s.C;
}

// ATen path's backward by the scatter kernels: vectorised over input channels, so at least a
// 64-byte vector of them. Their grad_input runs one sample per thread, so a single sample's
// grad_input takes ATen's dense backward, which splits the sample across the threads (batch 1,
// 512 -> 256 channels, 64x64, 1x1 filter, 3/2 pool, 2 threads: 1.72x stock dense, 0.66x
// scatter; benchmarks/results/NOTES.md). The rule leaves the thread count out so that results do
// not depend on it.
bool use_scatter_backward(const ConvPoolShape& s, int64_t elem_size, bool input_grad) {
  if (const int forced = env_choice("LIGHTNET_OPS_CPU_ATEN_BACKWARD", "scatter", "dense"); forced >= 0) {
    return forced == 1;
  }
  if (input_grad && s.N == 1) return false;
  return s.C * elem_size >= 64;
}

// Output channels per register block of the direct kernels: 4 with 16 vector registers; on
// AVX-512 (32 registers) 8, or 6 where that pads fewer channels (LightNet conv1: K = 6; the forward
// at batch 64 ran 13% faster with 6 than with 8, with or without the argmax).
int64_t channel_block(Isa isa, int64_t K) {
  if (isa != Isa::kAvx512) return 4;
  const auto padded = [K](int64_t kb) { return (K + kb - 1) / kb * kb; };
  return padded(6) < padded(8) ? 6 : 8;
}

// Samples per ATen-path convolution chunk: conv output of at most about 4 MiB (peak memory of
// one chunk, pooled while in cache), balanced, at least one sample per thread.
int64_t aten_forward_chunk(const ConvPoolShape& s, int64_t elem_size) {
  if (const char* env = std::getenv("LIGHTNET_OPS_CPU_ATEN_CHUNK")) {
    const int64_t n = std::atoll(env);
    if (n > 0) return n;
  }
  const int64_t sample_bytes = std::max<int64_t>(1, s.K * s.P * s.Q * elem_size);
  const int64_t per = std::max<int64_t>({int64_t(at::get_num_threads()), (int64_t(4) << 20) / sample_bytes, 1});
  const int64_t chunks = (s.N + per - 1) / per;
  return std::max<int64_t>(1, (s.N + chunks - 1) / chunks);
}

const char* name(ConvForward p) {
  switch (p) {
    case ConvForward::kNone: return "none";
    case ConvForward::kDirect: return "direct";
    case ConvForward::kDirectWinograd: return "direct-winograd";
    case ConvForward::kAtenConv: return "aten-conv";
    case ConvForward::kAtenWinograd: return "aten-winograd";
  }
  return "?";
}

const char* name(ConvBackward p) {
  switch (p) {
    case ConvBackward::kDirect: return "direct";
    case ConvBackward::kScatter: return "scatter";
    case ConvBackward::kDense: return "dense";
  }
  return "?";
}

const char* name(InputGrad g) { return g == InputGrad::kWinograd ? "winograd" : g == InputGrad::kDirect ? "direct" : "none"; }
const char* name(WeightGrad g) { return g == WeightGrad::kSpan ? "span" : g == WeightGrad::kDirect ? "direct" : "none"; }

struct LastRuns {
  bool have_forward = false, have_backward = false;
  ConvForwardRun forward;
  ConvBackwardRun backward;
};
thread_local LastRuns last_runs;

}  // namespace

ConvForwardPlan plan_forward(const ConvPoolShape& s, const at::Tensor& input, const at::Tensor& weight) {
  const int64_t elem = input.element_size();
  ConvForwardPlan p;
  p.isa = cpu_isa();
  // The direct kernel multiplies the conv padding's zeros by the weights, where ATen skips those
  // taps: non-finite weights take the ATen path, whose output is stock's.
  if (use_direct(s, elem, true) && tensor_is_finite(weight, p.isa)) {
    p.path = use_direct_winograd(s, "LIGHTNET_OPS_CPU_DIRECT_FORWARD", 3) ? ConvForward::kDirectWinograd
                                                                          : ConvForward::kDirect;
    p.channel_block = channel_block(p.isa, s.K);
    return p;
  }
  p.path = use_aten_winograd(s, elem) ? ConvForward::kAtenWinograd : ConvForward::kAtenConv;
  p.chunk = aten_forward_chunk(s, elem);
  return p;
}

ConvBackwardPlan plan_backward(const ConvPoolShape& s, const at::Tensor* grad_output, const at::Tensor& input,
                               const at::Tensor& weight, std::array<bool, 3> mask) {
  const int64_t elem = input.element_size();
  ConvBackwardPlan p;
  p.isa = cpu_isa();
  const bool direct = use_direct(s, elem, false);
  // The sparse paths multiply only the elements a selected conv position reads, where stock's dense
  // backward also multiplies the rest by zero: a non-finite weight (input) would give NaN across
  // stock's grad_input (grad_weight) only, so such operands take the dense path. The scatter
  // grad_input also adds its spans' zero lanes into neighbouring positions: a non-finite
  // grad_output takes the dense path too.
  const bool sparse =
      (direct || (use_scatter_backward(s, elem, mask[0]) &&
                  (!mask[0] || grad_output == nullptr || tensor_is_finite(grad_output->contiguous(), p.isa)))) &&
      (!mask[0] || tensor_is_finite(weight, p.isa)) && (!mask[1] || tensor_is_finite(input, p.isa));
  if (!sparse) {
    p.path = ConvBackward::kDense;
  } else if (!direct) {
    p.path = ConvBackward::kScatter;
  } else {
    p.path = ConvBackward::kDirect;
    p.channel_block = channel_block(p.isa, s.K);
    if (mask[0]) {
      p.input_grad = use_direct_winograd(s, "LIGHTNET_OPS_CPU_DIRECT_INPUT_GRAD", 4) ? InputGrad::kWinograd
                                                                                     : InputGrad::kDirect;
    }
    if (mask[1]) p.weight_grad = use_span_grad_weight(s, elem) ? WeightGrad::kSpan : WeightGrad::kDirect;
  }
  return p;
}

std::string describe(const ConvForwardPlan& plan) {
  std::string out = std::string("path=") + name(plan.path) + " isa=" + isa_name(plan.isa);
  if (plan.channel_block > 0) out += " kb=" + std::to_string(plan.channel_block);
  if (plan.chunk > 0) out += " chunk=" + std::to_string(plan.chunk);
  return out;
}

std::string describe(const ConvBackwardPlan& plan) {
  std::string out = std::string("path=") + name(plan.path) + " isa=" + isa_name(plan.isa);
  if (plan.path == ConvBackward::kDirect) {
    out += " kb=" + std::to_string(plan.channel_block) + " input_grad=" + name(plan.input_grad) +
           " weight_grad=" + name(plan.weight_grad);
  }
  return out;
}

std::string describe(const ConvForwardRun& run) {
  ConvForwardPlan ran = run.plan;
  ran.path = run.ran;
  return describe(ran) + " planned=" + name(run.plan.path) + " fallback_samples=" +
         std::to_string(run.fallback_samples);
}

std::string describe(const ConvBackwardRun& run) {
  ConvBackwardPlan ran = run.plan;
  ran.input_grad = run.input_grad;
  return describe(ran) + " planned_input_grad=" + name(run.plan.input_grad) +
         " fallback_samples=" + std::to_string(run.fallback_samples);
}

void record(const ConvForwardRun& run) {
  last_runs.forward = run;
  last_runs.have_forward = true;
}

void record(const ConvBackwardRun& run) {
  last_runs.backward = run;
  last_runs.have_backward = true;
}

namespace {

// (forward plan, backward plan) for these operands on this CPU under the current overrides, with
// grad_output taken to be finite. Runs nothing.
std::tuple<std::string, std::string> cpu_conv_plan(const at::Tensor& input, const at::Tensor& weight,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, at::IntArrayRef pool_kernel_size,
                                                   at::IntArrayRef pool_stride, std::array<bool, 3> output_mask) {
  constexpr const char* op = "_cpu_conv_plan";
  const ConvPoolShape s = check_conv2d_relu_maxpool2d(op, input, weight, std::nullopt, stride, padding, dilation,
                                                      pool_kernel_size, pool_stride);
  check_backend_dtype(op, input, "cpu", {at::kFloat, at::kDouble}, "float32 and float64");
  return {describe(plan_forward(s, input, weight)), describe(plan_backward(s, nullptr, input, weight, output_mask))};
}

// What the last conv2d_relu_maxpool2d forward and backward on this thread ran ("" if none yet).
std::tuple<std::string, std::string> cpu_conv_last_run() {
  return {last_runs.have_forward ? describe(last_runs.forward) : std::string(),
          last_runs.have_backward ? describe(last_runs.backward) : std::string()};
}

}  // namespace
}  // namespace cpu

// Debug ops of the CPU backend (not part of the public API): plan queries for tests and tuning.
TORCH_LIBRARY_FRAGMENT(lightnet_ops, m) {
  m.def(
      "_cpu_conv_plan(Tensor input, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, "
      "int[2] pool_kernel_size, int[2] pool_stride, bool[3] output_mask) -> (str, str)",
      &cpu::cpu_conv_plan);
  m.def("_cpu_conv_last_run() -> (str, str)", &cpu::cpu_conv_last_run);
}

}  // namespace lightnet_ops

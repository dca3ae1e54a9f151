// convnet_forward: a stack of conv2d_relu_maxpool2d stages, a flatten and linear stages (linear_relu,
// then a plain linear) in one call, as lo.LightNet's forward runs them. It calls the registered ops
// through the dispatcher (a CompositeImplicitAutograd kernel), so autograd, tangents, dispatch modes
// and the profiler see the ops the module-by-module forward calls (the last, plain linear stage as
// lightnet_ops::_linear_no_grad, which is aten::linear wherever autograd records it); what it
// removes is the Python between the layers (module calls, argument handling, one boxed call per
// layer), which is most of a small batch's time on the CPU.
//
// Inference on plain CPU tensors (nothing records autograd, nothing observes the ops: no dispatch
// mode, tracer or profiler) takes one parallel region instead: each thread runs every layer on its
// own slice of the samples (see inference_in_one_region). The layers' kernels and their choices are
// the ops', so the result is the per-op forward's, bitwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <deque>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "lightnet_ops/conv2d_relu_maxpool2d.h"
#include "lightnet_ops/convnet.h"
#include "lightnet_ops/cpu_conv_paths.h"
#include "lightnet_ops/cpu_conv_plan.h"
#include "lightnet_ops/cpu_linear.h"
#include "lightnet_ops/cpu_simd.h"
#include "lightnet_ops/op_handles.h"

TORCH_LIBRARY_FRAGMENT(lightnet_ops, m) {
  // conv_params: 13 ints per conv stage: stride, padding, dilation, pool_kernel_size, pool_stride,
  // pool_padding (pairs) and ceil_mode (0/1). Every linear stage but the last is linear_relu.
  m.def(
      "convnet_forward(Tensor input, Tensor[] conv_weights, Tensor?[] conv_biases, int[] conv_params, "
      "Tensor[] linear_weights, Tensor?[] linear_biases) -> Tensor");
}

namespace lightnet_ops {
namespace {

constexpr int64_t kConvParams = 13;

// Samples per step of a thread's slice in the one-region inference: every conv layer runs on this
// many samples before the next step, so that a step's activations stay in the core's cache. The
// linear layers then run on the whole slice's rows: the blocked GEMM packs W^T per call, which a
// step's rows would repay less well (LightNet at batch 256 ran slower with linear layers by step).
constexpr int64_t kSamplesPerStep = 32;

// The multiply-adds from which the CPU GEMMs split a product across threads (native_gemm's task
// size in csrc/cpu/linear_relu.cpp).
constexpr int64_t kMinSplitMacs = int64_t(1) << 18;

// Whether the last convnet_forward on this thread ran in one region (the _cpu_convnet_last_run
// debug op: "one-region", "per-op", or "" before any call).
thread_local const char* last_run = "";

// A plain CPU tensor of this dtype: no subclass, functionalization or other wrapper (its dispatch
// keys are the CPU backend's, autograd's and autocast's only), no gradient to record, no tangent.
bool plain_cpu(const at::Tensor& t, at::ScalarType dtype) {
  static const c10::DispatchKeySet cpu(c10::DispatchKey::CPU);
  return (t.key_set() - c10::autograd_dispatch_keyset_with_ADInplaceOrView - c10::autocast_dispatch_keyset) == cpu &&
         t.scalar_type() == dtype && !(at::GradMode::is_enabled() && t.requires_grad()) && !has_tangent(t);
}

// Nothing that must see each layer's op: the thread's included dispatch keys are the defaults (no
// TorchDispatchMode, torch.func transform or JIT tracer), no autocast, and no RecordFunction
// observer (the profiler) is registered.
bool unobserved() {
  // torch.inference_mode() leaves ADInplaceOrView out of the included keys.
  const c10::DispatchKeySet view(c10::DispatchKey::ADInplaceOrView);
  return (c10::impl::tls_local_dispatch_key_set().included_ - view) == (c10::default_included_set - view) &&
         !any_autocast_enabled() && !at::hasCallbacks();
}

// The inference forward in one parallel region, or nullopt where the per-op forward must run: any
// operand not plain_cpu, a conv layer the CPU kernels would not run by their direct path (per
// sample, so a slice of the samples can run alone), a linear layer they would run by BLAS, or an
// argument the ops would reject (the per-op forward then raises their errors).
//
// Every layer's kernel, its choice (planned for the whole batch) and its packed weights are the
// op's; a thread runs the conv layers on its slice, kSamplesPerStep samples at a time, then the
// linear layers on the slice's rows, so the batch costs one fork and join instead of one per
// layer, and the small layers that run on one thread per op (LightNet's fc2 and fc3 at batch 8)
// are split too.
std::optional<at::Tensor> inference_in_one_region(const at::Tensor& input, at::TensorList conv_weights,
                                                  const c10::List<std::optional<at::Tensor>>& conv_biases,
                                                  at::IntArrayRef conv_params, at::TensorList linear_weights,
                                                  const c10::List<std::optional<at::Tensor>>& linear_biases) {
  if (cpu::env_choice("LIGHTNET_OPS_CPU_CONVNET", "one-region", "per-op") == 0) return std::nullopt;
  const at::ScalarType dtype = input.scalar_type();
  if (!unobserved() || !plain_cpu(input, dtype) || !input.is_contiguous() || input.size(0) == 0) return std::nullopt;
  const auto plain_bias = [&](const std::optional<at::Tensor>& b) { return !b.has_value() || plain_cpu(*b, dtype); };
  for (size_t i = 0; i < conv_weights.size(); ++i) {
    if (!plain_cpu(conv_weights[i], dtype) || !plain_bias(conv_biases.get(i))) return std::nullopt;
  }
  for (size_t i = 0; i < linear_weights.size(); ++i) {
    if (!plain_cpu(linear_weights[i], dtype) || !plain_bias(linear_biases.get(i))) return std::nullopt;
  }
  const int64_t N = input.size(0);
  // The linear layers first (shapes only): a layer BLAS would run ends the attempt before anything
  // is allocated or packed. With fewer samples than threads the region leaves threads idle, where
  // an op would split a large layer by columns: such batches take the region only while every
  // linear layer is below the per-op split (about 2^18 multiply-adds: LightNet's fc1 at batch 1
  // is about 2^16).
  const bool few_samples = N < at::get_num_threads();
  for (const at::Tensor& weight : linear_weights) {
    if (weight.dim() != 2 || !linear_rows_would_run(dtype, N, weight.size(0), weight.size(1)) ||
        (few_samples && N * weight.size(0) * weight.size(1) >= kMinSplitMacs)) {
      return std::nullopt;
    }
  }
  // Deques: the layers hold pointers into these elements, which must not move as more are added.
  std::deque<at::Tensor> keep;  // contiguous operands and the activations, alive until the region ends
  std::deque<cpu::DirectForward> convs;
  std::vector<std::function<void(int64_t, int64_t)>> linears;  // rows [begin, end) of each linear layer
  const auto contiguous = [&](const at::Tensor& t) -> const at::Tensor& { return keep.emplace_back(t.contiguous()); };
  const auto contiguous_bias = [&](const std::optional<at::Tensor>& b) {
    return b.has_value() ? contiguous(*b) : at::Tensor();
  };
  at::Tensor x = input;
  try {
    const at::Tensor empty_argmax = at::empty({0}, input.options().dtype(at::kByte));
    for (size_t i = 0; i < conv_weights.size(); ++i) {
      constexpr const char* op = "conv2d_relu_maxpool2d";
      const int64_t* p = conv_params.data() + i * kConvParams;
      if (composite::pool_needs_composite({p[10], p[11]}, p[12] != 0)) return std::nullopt;
      const std::optional<at::Tensor> bias = conv_biases.get(i);
      const ConvPoolShape s = check_conv2d_relu_maxpool2d(op, x, conv_weights[i], bias, {p[0], p[1]}, {p[2], p[3]},
                                                          {p[4], p[5]}, {p[6], p[7]}, {p[8], p[9]});
      check_backend_dtype(op, x, "cpu", {at::kFloat, at::kDouble}, "float32 and float64");
      const cpu::ConvForwardPlan plan = cpu::plan_forward(s, x, conv_weights[i]);
      if ((plan.path != cpu::ConvForward::kDirect && plan.path != cpu::ConvForward::kDirectWinograd) ||
          s.K * s.PH * s.PW == 0) {
        return std::nullopt;
      }
      at::Tensor& out = keep.emplace_back(at::empty({s.N, s.K, s.PH, s.PW}, input.options()));
      at::Tensor& argmax = keep.emplace_back(empty_argmax);
      convs.emplace_back(s, plan, x, contiguous(conv_weights[i]), contiguous_bias(bias), out, argmax, false);
      x = out;
    }
    x = x.flatten(1);
    const int64_t stages = static_cast<int64_t>(linear_weights.size());
    for (int64_t i = 0; i < stages; ++i) {
      const at::Tensor& weight = contiguous(linear_weights[i]);
      at::Tensor& out = keep.emplace_back(at::empty({N, weight.size(0)}, input.options()));
      std::optional<at::Tensor> bias;
      if (linear_biases.get(i).has_value()) bias = contiguous(*linear_biases.get(i));
      auto rows = prepare_linear_rows(x, weight, bias, /*relu=*/i + 1 < stages, out);
      if (!rows) return std::nullopt;
      linears.push_back(std::move(rows));
      x = out;
    }
  } catch (const c10::Error&) {
    return std::nullopt;  // the per-op forward raises the op's own error
  }
  const auto run_slice = [&](int64_t begin, int64_t end) {
    for (int64_t step = begin; step < end; step += kSamplesPerStep) {
      const int64_t step_end = std::min(end, step + kSamplesPerStep);
      for (const auto& conv : convs) conv.run(step, step_end);
    }
    for (const auto& linear : linears) linear(begin, end);
  };
  if (N == 1) {
    run_slice(0, 1);
  } else {
    at::parallel_for(0, N, 1, run_slice);
  }
  for (const auto& conv : convs) cpu::record(conv.result());
  last_run = "one-region";
  return x;
}

std::string cpu_convnet_last_run() { return last_run; }

}  // namespace

at::Tensor convnet_forward(const at::Tensor& input, at::TensorList conv_weights,
                           const c10::List<std::optional<at::Tensor>>& conv_biases, at::IntArrayRef conv_params,
                           at::TensorList linear_weights, const c10::List<std::optional<at::Tensor>>& linear_biases) {
  const auto& conv_pool = conv_pool_op();
  const auto& linear_relu = linear_relu_op();
  const int64_t convs = static_cast<int64_t>(conv_weights.size());
  const int64_t linears = static_cast<int64_t>(linear_weights.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(conv_biases.size()) == convs && conv_params.size() == size_t(convs * kConvParams),
                    "convnet_forward: expected one bias and ", kConvParams, " parameters per conv stage");
  TORCH_CHECK_VALUE(static_cast<int64_t>(linear_biases.size()) == linears && linears >= 1,
                    "convnet_forward: expected at least one linear stage and one bias per linear stage");
  TORCH_CHECK_VALUE(input.dim() == 4, "convnet_forward: expected 4-D (N, C, H, W) input, got ", input.dim(), "-D");
  if (input.is_cpu()) {
    if (auto out = inference_in_one_region(input, conv_weights, conv_biases, conv_params, linear_weights,
                                           linear_biases)) {
      return *out;
    }
    last_run = "per-op";
  }
  at::Tensor x = input;
  for (int64_t i = 0; i < convs; ++i) {
    const int64_t* p = conv_params.data() + i * kConvParams;
    const std::optional<at::Tensor> bias = conv_biases.get(i);
    x = std::get<0>(conv_pool.call(x, conv_weights[i], bias, {p[0], p[1]}, {p[2], p[3]}, {p[4], p[5]}, {p[6], p[7]},
                                   {p[8], p[9]}, needs_grad(x, conv_weights[i], bias), {p[10], p[11]}, p[12] != 0));
  }
  x = x.flatten(1);
  for (int64_t i = 0; i + 1 < linears; ++i) x = linear_relu.call(x, linear_weights[i], linear_biases.get(i));
  // The last stage is a plain linear: _linear_no_grad, which is at::linear wherever a gradient or
  // tangent is recorded and otherwise runs the project's CPU GEMMs (stock's BLAS took 7 us for
  // LightNet's 8 x 84 -> 10 on an EPYC).
  return linear_no_grad_op().call(x, linear_weights[linears - 1], linear_biases.get(linears - 1));
}

}  // namespace lightnet_ops

TORCH_LIBRARY_IMPL(lightnet_ops, CompositeImplicitAutograd, m) {
  m.impl("convnet_forward", &lightnet_ops::convnet_forward);
}

// Debug op of the CPU backend (not part of the public API): how the last convnet_forward ran.
TORCH_LIBRARY_FRAGMENT(lightnet_ops, m) { m.def("_cpu_convnet_last_run() -> str", &lightnet_ops::cpu_convnet_last_run); }

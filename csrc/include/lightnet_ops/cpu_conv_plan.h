// The CPU conv2d_relu_maxpool2d's kernel choice: one plan per call, made in one place
// (csrc/cpu/conv_plan.cpp: the rules, the LIGHTNET_OPS_CPU_* overrides and the instruction set),
// carried out by one file per path (csrc/cpu/conv_*.cpp), and recorded with what actually ran
// (data-dependent fallbacks included) for the `_cpu_conv_last_run` debug op.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <string>

#include "lightnet_ops/checks.h"
#include "lightnet_ops/cpu_simd.h"

namespace lightnet_ops {
namespace cpu {

enum class ConvForward : uint8_t {
  kNone,            // empty output: nothing computed
  kDirect,          // direct kernel (few input channels): no conv output materialised
  kDirectWinograd,  // its Winograd F(2x2, 3x3) variant
  kAtenConv,        // ATen's convolution in batch chunks + the fused bias / pool / ReLU pass
  kAtenWinograd,    // Winograd F(2x2, 3x3) GEMMs with the pool fused into the output transform
};

enum class ConvBackward : uint8_t {
  kDirect,   // direct kernels: grad_input / grad_weight / grad_bias from the packed planes
  kScatter,  // from the live pooled elements only, vectorised over input channels
  kDense,    // the routed dense conv-output gradient through ATen's convolution_backward
};

// How the direct backward computes grad_input and grad_weight.
enum class InputGrad : uint8_t { kNone, kDirect, kWinograd };
enum class WeightGrad : uint8_t { kNone, kDirect, kSpan };

struct ConvForwardPlan {
  ConvForward path = ConvForward::kNone;
  Isa isa = Isa::kDefault;
  int64_t channel_block = 0;  // direct paths: output channels per register block
  int64_t chunk = 0;          // ATen paths: samples per convolution chunk
};

struct ConvBackwardPlan {
  ConvBackward path = ConvBackward::kDense;
  Isa isa = Isa::kDefault;
  int64_t channel_block = 0;              // direct: output channels per register block
  InputGrad input_grad = InputGrad::kNone;  // direct
  WeightGrad weight_grad = WeightGrad::kNone;  // direct
};

// What one call ran: the plan, then what the data allowed (a Winograd path hands non-finite or
// overflowing values to its plain counterpart, for the whole call or per sample).
struct ConvForwardRun {
  ConvForwardPlan plan;
  ConvForward ran = ConvForward::kNone;
  int64_t fallback_samples = 0;  // direct Winograd: samples recomputed by the direct kernel
};

struct ConvBackwardRun {
  ConvBackwardPlan plan;
  InputGrad input_grad = InputGrad::kNone;  // what computed grad_input (direct path)
  int64_t fallback_samples = 0;  // direct Winograd grad_input: samples computed directly
};

// The plans for one call. Reads the overrides and the instruction set (LIGHTNET_OPS_CPU_*) now,
// and scans operands for non-finite values where a rule depends on them (the sparse backwards and
// the direct forward skip products that stock's dense kernels do, which matters only then).
// `grad_output` may be null (the plan query): it is then taken to be finite.
ConvForwardPlan plan_forward(const ConvPoolShape& s, const at::Tensor& input, const at::Tensor& weight);
ConvBackwardPlan plan_backward(const ConvPoolShape& s, const at::Tensor* grad_output, const at::Tensor& input,
                               const at::Tensor& weight, std::array<bool, 3> output_mask);

// "path=direct-winograd planned=direct-winograd isa=avx512 kb=8 fallback_samples=0" and the like.
std::string describe(const ConvForwardPlan& plan);
std::string describe(const ConvBackwardPlan& plan);
std::string describe(const ConvForwardRun& run);
std::string describe(const ConvBackwardRun& run);

// The last forward / backward run on the calling thread (what `_cpu_conv_last_run` reports).
void record(const ConvForwardRun& run);
void record(const ConvBackwardRun& run);

}  // namespace cpu
}  // namespace lightnet_ops

// CPU kernels for linear_relu (float32, float64): BLAS GEMM with the bias folded in (addmm),
// then ReLU in place; backward gates the gradient by the saved output in one pass and feeds it
// to two GEMMs and a column sum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lightnet_ops/conv_params.h"

namespace lightnet_ops {
namespace {

void check_cpu_dtype(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
              ": the cpu backend supports float32 and float64, got ", t.scalar_type(),
              " (use backend=\"reference\" for other dtypes)");
}

at::Tensor linear_relu_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_linear(input, weight, bias);
  check_cpu_dtype(input, "linear_relu");
  at::Tensor out = (bias.has_value() && bias->defined()) ? at::addmm(*bias, input, weight.t())
                                                         : at::mm(input, weight.t());
  return out.relu_();  // clamp_min keeps NaN, like F.relu
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_cpu(const at::Tensor& grad_output,
                                                                        const at::Tensor& input,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& output,
                                                                        std::array<bool, 3> output_mask) {
  check_linear(input, weight, c10::nullopt);
  check_cpu_dtype(input, "linear_relu_backward");
  TORCH_CHECK(grad_output.sizes() == output.sizes() && output.dim() == 2 && output.size(0) == input.size(0) &&
                  output.size(1) == weight.size(0),
              "linear_relu_backward: grad_output ", grad_output.sizes(), " and output ", output.sizes(),
              " must both be [", input.size(0), ", ", weight.size(0), "]");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type() && output.scalar_type() == input.scalar_type(),
              "linear_relu_backward: grad_output/output dtypes must match input dtype ", input.scalar_type());
  const auto g = grad_output.contiguous();
  const auto o = output.contiguous();
  auto gated = at::empty_like(g, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "linear_relu_backward_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* op = o.const_data_ptr<scalar_t>();
    scalar_t* dst = gated.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.numel(), 16384, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) dst[i] = relu_passes_grad(op[i]) ? gp[i] : scalar_t(0);
    });
  });
  // Each masked-off output is its own empty tensor: outputs must not alias.
  const auto empty = [&] { return at::empty({0}, input.options()); };
  at::Tensor grad_input = empty(), grad_weight = empty();
  // The two GEMMs have the same size (M * out * in multiply-adds) and are independent. With two
  // threads (this machine class), or for GEMMs too small to split well across more, run them side
  // by side, one thread each, instead of splitting each across the threads (and synchronising);
  // nested ATen/BLAS calls inside parallel_for run single-threaded. Larger GEMMs on more cores
  // keep the BLAS's own threading.
  // Tiny GEMMs (a few microseconds each) stay on the calling thread: waking a worker costs more
  // (about 16 us vs 8 us for the whole backward at M=2, in=16, out=4 with two threads).
  const int threads = at::get_num_threads();
  const int64_t macs = input.size(0) * input.size(1) * weight.size(0);
  const bool small = macs <= (int64_t(1) << 24);
  const bool tiny = macs < (int64_t(1) << 16);
  if (output_mask[0] && output_mask[1] && !tiny && (threads == 2 || (threads > 2 && small)) &&
      !at::in_parallel_region()) {
    grad_input = at::empty({input.size(0), input.size(1)}, input.options());
    grad_weight = at::empty({weight.size(0), weight.size(1)}, input.options());
    at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
      // Worker threads do not inherit the caller's dispatch state: skip autograd there too.
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t task = begin; task < end; ++task) {
        if (task == 0) {
          at::mm_out(grad_input, gated, weight);
        } else {
          at::mm_out(grad_weight, gated.t(), input);
        }
      }
    });
  } else {
    if (output_mask[0]) grad_input = at::mm(gated, weight);
    if (output_mask[1]) grad_weight = at::mm(gated.t(), input);
  }
  return {grad_input, grad_weight, output_mask[2] ? gated.sum(0) : empty()};
}

}  // namespace

TORCH_LIBRARY_IMPL(lightnet_ops, CPU, m) {
  m.impl("linear_relu", &linear_relu_cpu);
  m.impl("linear_relu_backward", &linear_relu_backward_cpu);
}

}  // namespace lightnet_ops

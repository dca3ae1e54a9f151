// CUDA backward of conv2d_relu_maxpool2d (float32, float16, bfloat16 with float32 accumulation;
// float64 with float64 accumulation).
//
//  * grad_conv (N, K, P, Q): a gather kernel. Each conv-output element visits the pooled windows
//    that contain it (pool_windows_containing) and sums the pooled gradients whose argmax selected
//    it; windows whose argmax is the ReLU sentinel (255) never match. Every element is written
//    exactly once by one thread, so overlapping windows need no atomics and the result is
//    deterministic (fixed summation order: ph, then pw, ascending).
//  * grad_bias (K): a deterministic block reduction per output channel straight from grad_output
//    and argmax (each live pooled gradient lands on exactly one conv element, so this equals the
//    sum of grad_conv over N, P, Q) in a fixed tree order.
//  * grad_input / grad_weight: ATen's convolution_backward (cuDNN) on grad_conv, for all sizes.
#include <torch/library.h>

#include "lightnet_ops/conv_params.h"
#include "lightnet_ops/cuda_utils.cuh"

namespace lightnet_ops {
namespace cuda {
namespace {

template <typename scalar_t>
__global__ void route_grad_gather_kernel(const scalar_t* __restrict__ grad_out,  // (N, K, PH, PW) contiguous
                                         const uint8_t* __restrict__ argmax,     // (N, K, PH, PW) contiguous
                                         scalar_t* __restrict__ grad_conv,       // (N, K, P, Q) contiguous
                                         const ConvPoolShape s) {
  using acc_t = acc_type<scalar_t>;
  const int64_t total = s.N * s.K * s.P * s.Q;
  const int64_t phw = s.PH * s.PW;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ow = idx % s.Q;
    const int64_t t = idx / s.Q;
    const int64_t oh = t % s.P;
    const int64_t plane = t / s.P;  // n * K + k
    int64_t ph0, ph1, pw0, pw1;
    pool_windows_containing(oh, s.pool_kh, s.pool_sh, s.PH, &ph0, &ph1);
    pool_windows_containing(ow, s.pool_kw, s.pool_sw, s.PW, &pw0, &pw1);
    const scalar_t* g = grad_out + plane * phw;
    const uint8_t* am = argmax + plane * phw;
    acc_t sum = acc_t(0);
    for (int64_t ph = ph0; ph <= ph1; ++ph) {
      const int64_t row_off = (oh - ph * s.pool_sh) * s.pool_kw;  // in [0, pool_kh) * pool_kw
      for (int64_t pw = pw0; pw <= pw1; ++pw) {
        const int64_t e = ph * s.PW + pw;
        // Offsets are < kh * kw <= 255, so the sentinel never matches.
        if (static_cast<int64_t>(am[e]) == row_off + (ow - pw * s.pool_sw)) sum += static_cast<acc_t>(g[e]);
      }
    }
    grad_conv[idx] = static_cast<scalar_t>(sum);
  }
}

// grad_bias[k] = sum over n, ph, pw of grad_out where argmax is not the ReLU sentinel. One block
// per channel (grid-stride over channels); fixed per-thread order, then a fixed tree.
template <typename scalar_t, int kBlock>
__global__ void bias_grad_kernel(const scalar_t* __restrict__ grad_out,  // (N, K, PH, PW) contiguous
                                 const uint8_t* __restrict__ argmax,     // (N, K, PH, PW) contiguous
                                 scalar_t* __restrict__ grad_bias,       // (K)
                                 const int64_t N, const int64_t K, const int64_t phw) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t partial[kBlock];
  const int tid = threadIdx.x;
  const int64_t count = N * phw;
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    acc_t sum = acc_t(0);
    for (int64_t i = tid; i < count; i += kBlock) {
      const int64_t n = i / phw;
      const int64_t e = (n * K + k) * phw + (i - n * phw);
      if (argmax[e] != kArgmaxReluZero) sum += static_cast<acc_t>(grad_out[e]);
    }
    partial[tid] = sum;
    __syncthreads();
    for (int half = kBlock / 2; half > 0; half /= 2) {
      if (tid < half) partial[tid] += partial[tid + half];
      __syncthreads();
    }
    if (tid == 0) grad_bias[k] = static_cast<scalar_t>(partial[0]);
    __syncthreads();  // partial[0] is read before the next channel overwrites it
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_maxpool2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& argmax,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef pool_kernel_size,
    at::IntArrayRef pool_stride, std::array<bool, 3> output_mask) {
  constexpr const char* op = "conv2d_relu_maxpool2d_backward";
  const ConvPoolShape s =
      conv_pool_shape(input, weight, std::nullopt, stride, padding, dilation, pool_kernel_size, pool_stride);
  check_cuda_tensor(input, op, "input");
  check_cuda_dtype(input, op);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({s.N, s.K, s.PH, s.PW}), op, ": grad_output has shape ",
              grad_output.sizes(), ", expected [", s.N, ", ", s.K, ", ", s.PH, ", ", s.PW, "]");
  TORCH_CHECK(argmax.scalar_type() == at::kByte && argmax.sizes() == grad_output.sizes(), op,
              ": argmax must be uint8 of shape ", grad_output.sizes(), ", got ", argmax.scalar_type(), " ",
              argmax.sizes(), " (was the forward run with need_argmax=true?)");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), op, ": grad_output dtype ",
              grad_output.scalar_type(), " does not match input dtype ", input.scalar_type());
  check_same_device(grad_output, input, op, "grad_output");
  check_same_device(argmax, input, op, "argmax");
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto empty = at::empty({0}, input.options());
  at::Tensor grad_input = empty, grad_weight = empty, grad_bias = empty;

  // No gradient reaches anything (empty batch or channels), or there is nothing to differentiate
  // against: every requested gradient is zero. cuDNN is not asked about degenerate sizes.
  if (grad_output.numel() == 0 || input.numel() == 0 || weight.numel() == 0) {
    if (output_mask[0]) grad_input = at::zeros(input.sizes(), input.options());
    if (output_mask[1]) grad_weight = at::zeros(weight.sizes(), weight.options());
    if (output_mask[2]) grad_bias = at::zeros({s.K}, input.options());
    return {grad_input, grad_weight, grad_bias};
  }

  const auto g = grad_output.contiguous();
  const auto am = argmax.contiguous();
  if (output_mask[2]) {
    constexpr int kBlock = 256;
    grad_bias = at::empty({s.K}, input.options());
    const unsigned int grid = static_cast<unsigned int>(std::min(s.K, kMaxBlocks));
    LIGHTNET_OPS_DISPATCH_CUDA_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_cuda_bias_grad", [&] {
      bias_grad_kernel<scalar_t, kBlock><<<grid, kBlock, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), am.const_data_ptr<uint8_t>(), grad_bias.mutable_data_ptr<scalar_t>(), s.N,
          s.K, s.PH * s.PW);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (output_mask[0] || output_mask[1]) {
    auto grad_conv = at::empty({s.N, s.K, s.P, s.Q}, input.options());
    LIGHTNET_OPS_DISPATCH_CUDA_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_cuda_route_grad", [&] {
      route_grad_gather_kernel<scalar_t><<<blocks_for(grad_conv.numel()), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), am.const_data_ptr<uint8_t>(), grad_conv.mutable_data_ptr<scalar_t>(), s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    auto grads = at::convolution_backward(grad_conv, input, weight, std::nullopt, stride, padding, dilation, false,
                                          {0, 0}, 1, {output_mask[0], output_mask[1], false});
    if (output_mask[0]) grad_input = std::get<0>(grads);
    if (output_mask[1]) grad_weight = std::get<1>(grads);
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(lightnet_ops, CUDA, m) {
  m.impl("conv2d_relu_maxpool2d_backward", &conv2d_relu_maxpool2d_backward_cuda);
}

}  // namespace cuda
}  // namespace lightnet_ops

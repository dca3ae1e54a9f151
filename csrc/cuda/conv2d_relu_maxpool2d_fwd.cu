// CUDA forward of conv2d_relu_maxpool2d (float32, float16, bfloat16 with float32 accumulation;
// float64 with float64 accumulation).
//
// Two paths, picked per call by choose_path() below:
//  * direct: one fused kernel computes conv + bias, max-pools the biased values, applies ReLU and
//    writes only the pooled output (N, K, PH, PW) and, when asked, the one-byte argmax. One
//    thread per pooled element; the filter of the block's output channel sits in shared memory.
//    The conv output is never materialised. Cost per pooled element: kh*kw*C*R*S FMAs without
//    tensor cores, so it only pays for small C*R*S (LightNet: 1*3*3 and 6*3*3).
//  * cudnn: ATen's convolution (cuDNN) without bias into a scratch (N, K, P, Q) tensor (any
//    memory format: channels_last input gives a channels_last scratch, read through its strides),
//    then one fused bias + max-pool + ReLU + argmax kernel.
//
// Heuristic: direct when C*R*S <= kDirectMaxCRS and every size fits the kernel's 32-bit in-plane
// index math, else cudnn. Override for tuning and tests with the environment variable
// LIGHTNET_OPS_CUDA_CONV_PATH=direct|cudnn (read on every call; anything else means auto; see
// cuda_conv_direct.cuh).
#include <torch/library.h>

#include "lightnet_ops/conv2d_relu_maxpool2d.h"
#include "lightnet_ops/cuda_conv_direct.cuh"
#include "lightnet_ops/cuda_utils.cuh"

namespace lightnet_ops {
namespace cuda {
namespace {

// Largest C*R*S that takes the direct path by default (see the heuristic above).
constexpr int64_t kDirectMaxCRS = 256;
// Shared memory the direct kernel may use for one output channel's filter (the default 48 KiB
// limit needs no opt-in). Larger filters (only reachable by forcing the direct path) are read
// from global memory instead.
constexpr int64_t kDirectMaxSmemBytes = 48 * 1024;

enum class ConvPath { kDirect, kCudnn };

ConvPath choose_path(const ConvPoolShape& s, const at::Tensor& input) {
  if (!direct_fits(s)) return ConvPath::kCudnn;
  const ForcedPath forced = forced_path(/*backward=*/false);
  if (forced == ForcedPath::kDirect) return ConvPath::kDirect;
  // An input with no elements (C == 0, or H == 0 with padding) has a conv output equal to the
  // bias; the direct kernel handles it without asking cuDNN about degenerate sizes.
  if (input.numel() == 0) return ConvPath::kDirect;
  if (forced == ForcedPath::kCudnn) return ConvPath::kCudnn;
  return s.C * s.R * s.S <= kDirectMaxCRS ? ConvPath::kDirect : ConvPath::kCudnn;
}

// One thread per pooled element (n, k, ph, pw): grid.y walks output channels k, grid.x walks the
// N * PH * PW pooled positions of that channel (grid-stride loops in both).
template <typename scalar_t, bool kWeightsInSmem>
__global__ void conv_relu_pool_direct_kernel(const scalar_t* __restrict__ input,   // (N, C, H, W) contiguous
                                             const scalar_t* __restrict__ weight,  // (K, C, R, S) contiguous
                                             const scalar_t* __restrict__ bias,    // (K) or nullptr
                                             scalar_t* __restrict__ out,           // (N, K, PH, PW) contiguous
                                             uint8_t* __restrict__ argmax,         // (N, K, PH, PW) or nullptr
                                             const DirectParams p) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* w_smem = reinterpret_cast<acc_t*>(smem_raw);  // (C, R, S) of channel k when kWeightsInSmem

  const int crs = p.C * p.R * p.S;
  const int hw = p.H * p.W;
  const int64_t chw = static_cast<int64_t>(p.C) * hw;
  const int64_t phw = static_cast<int64_t>(p.PH) * p.PW;
  const int64_t total = p.N * phw;
  const int window = p.pool_kh * p.pool_kw;

  for (int64_t k = blockIdx.y; k < p.K; k += gridDim.y) {
    const scalar_t* wk = weight + k * crs;
    if (kWeightsInSmem) {
      __syncthreads();  // the previous channel's filter is no longer read
      for (int i = threadIdx.x; i < crs; i += blockDim.x) w_smem[i] = static_cast<acc_t>(wk[i]);
      __syncthreads();
    }
    const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[k]) : acc_t(0);
    for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
         idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t n = idx / phw;
      const int rest = static_cast<int>(idx - n * phw);
      const int ph = rest / p.PW;
      const int pw = rest - ph * p.PW;
      const scalar_t* xn = input + n * chw;

      acc_t best = acc_t(0);
      int best_off = 0;
      for (int off = 0; off < window; ++off) {  // row-major window order, as stock scans it
        const int i = off / p.pool_kw;
        const int j = off - i * p.pool_kw;
        const int ih0 = (ph * p.pool_sh + i) * p.stride_h - p.pad_h;
        const int iw0 = (pw * p.pool_sw + j) * p.stride_w - p.pad_w;
        acc_t sum = acc_t(0);
        for (int c = 0; c < p.C; ++c) {
          const scalar_t* xc = xn + static_cast<int64_t>(c) * hw;
          for (int r = 0; r < p.R; ++r) {
            const int ih = ih0 + r * p.dil_h;
            if (ih < 0 || ih >= p.H) continue;
            for (int q = 0; q < p.S; ++q) {
              const int iw = iw0 + q * p.dil_w;
              if (iw < 0 || iw >= p.W) continue;
              const int widx = (c * p.R + r) * p.S + q;
              const acc_t wv = kWeightsInSmem ? w_smem[widx] : static_cast<acc_t>(wk[widx]);
              sum += static_cast<acc_t>(xc[ih * p.W + iw]) * wv;
            }
          }
        }
        // Round the biased conv value to the tensor dtype, as stock's conv output is, before the
        // pool compares it (ties and NaN are decided on the values stock would see).
        const acc_t v = static_cast<acc_t>(static_cast<scalar_t>(sum + b));
        if (off == 0 || pool_takes(v, best)) {
          best = v;
          best_off = off;
        }
      }
      const int64_t o = (n * p.K + k) * phw + rest;
      out[o] = static_cast<scalar_t>(relu(best));
      if (argmax != nullptr) argmax[o] = encode_argmax(best, best_off);
    }
  }
}

// Bias + max-pool + ReLU + argmax over a conv output of any strides. One thread per pooled
// element; idx walks the contiguous (N, K, PH, PW) output.
template <typename scalar_t>
__global__ void bias_relu_pool_kernel(const scalar_t* __restrict__ conv,  // (N, K, P, Q), strides below
                                      const int64_t conv_sn, const int64_t conv_sk, const int64_t conv_sp,
                                      const int64_t conv_sq,
                                      const scalar_t* __restrict__ bias,  // (K) or nullptr
                                      scalar_t* __restrict__ out,         // (N, K, PH, PW) contiguous
                                      uint8_t* __restrict__ argmax,       // (N, K, PH, PW) or nullptr
                                      const ConvPoolShape s) {
  using acc_t = acc_type<scalar_t>;
  const int64_t total = s.N * s.K * s.PH * s.PW;
  const int64_t window = s.pool_kh * s.pool_kw;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pw = idx % s.PW;
    int64_t t = idx / s.PW;
    const int64_t ph = t % s.PH;
    t /= s.PH;
    const int64_t k = t % s.K;
    const int64_t n = t / s.K;
    const scalar_t* win = conv + n * conv_sn + k * conv_sk + ph * s.pool_sh * conv_sp + pw * s.pool_sw * conv_sq;
    const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[k]) : acc_t(0);
    acc_t best = acc_t(0);
    int64_t best_off = 0;
    for (int64_t off = 0; off < window; ++off) {
      const int64_t i = off / s.pool_kw;
      const int64_t j = off - i * s.pool_kw;
      // Bias added (and rounded to the tensor dtype) before the comparison, as in the CPU kernel.
      const acc_t v = static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(win[i * conv_sp + j * conv_sq]) + b));
      if (off == 0 || pool_takes(v, best)) {
        best = v;
        best_off = off;
      }
    }
    out[idx] = static_cast<scalar_t>(relu(best));
    if (argmax != nullptr) argmax[idx] = encode_argmax(best, best_off);
  }
}

void launch_direct(const ConvPoolShape& s, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                   at::Tensor& out, at::Tensor* argmax) {
  const auto x = input.contiguous();
  const auto w = weight.contiguous();
  const DirectParams p = make_direct_params(s);
  const int64_t total = s.N * s.PH * s.PW;
  const dim3 grid(blocks_for(total), static_cast<unsigned int>(std::min(s.K, kMaxGridYZ)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LIGHTNET_OPS_DISPATCH_CUDA_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_cuda_direct", [&] {
    using acc_t = acc_type<scalar_t>;
    const int64_t smem = s.C * s.R * s.S * static_cast<int64_t>(sizeof(acc_t));
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    uint8_t* am = argmax != nullptr ? argmax->mutable_data_ptr<uint8_t>() : nullptr;
    if (smem <= kDirectMaxSmemBytes) {
      conv_relu_pool_direct_kernel<scalar_t, true><<<grid, kThreads, static_cast<size_t>(smem), stream>>>(
          x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), b, out.mutable_data_ptr<scalar_t>(), am, p);
    } else {
      conv_relu_pool_direct_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), b, out.mutable_data_ptr<scalar_t>(), am, p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_cudnn(const ConvPoolShape& s, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, at::Tensor& out,
                  at::Tensor* argmax) {
  // Scratch conv output (N, K, P, Q), without bias: the epilogue adds it before pooling.
  const at::Tensor conv =
      at::convolution(input, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, 1);
  TORCH_INTERNAL_ASSERT(conv.dim() == 4 && conv.size(0) == s.N && conv.size(1) == s.K && conv.size(2) == s.P &&
                            conv.size(3) == s.Q,
                        "conv2d_relu_maxpool2d: unexpected conv output shape ", conv.sizes());
  const int64_t total = s.N * s.K * s.PH * s.PW;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LIGHTNET_OPS_DISPATCH_CUDA_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_cuda_epilogue", [&] {
    bias_relu_pool_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        conv.const_data_ptr<scalar_t>(), conv.stride(0), conv.stride(1), conv.stride(2), conv.stride(3),
        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
        argmax != nullptr ? argmax->mutable_data_ptr<uint8_t>() : nullptr, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_maxpool2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias,
                                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                                              at::IntArrayRef dilation,
                                                              at::IntArrayRef pool_kernel_size,
                                                              at::IntArrayRef pool_stride, bool need_argmax) {
  constexpr const char* op = "conv2d_relu_maxpool2d";
  const ConvPoolShape s =
      check_conv2d_relu_maxpool2d(op, input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride);
  check_cuda_tensor(input, op, "input");
  check_cuda_dtype(input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  auto out = at::empty({s.N, s.K, s.PH, s.PW}, input.options());
  auto argmax = need_argmax ? at::empty({s.N, s.K, s.PH, s.PW}, input.options().dtype(at::kByte))
                            : at::empty({0}, input.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, argmax};
  const at::Tensor b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  at::Tensor* am = need_argmax ? &argmax : nullptr;
  if (choose_path(s, input) == ConvPath::kDirect) {
    launch_direct(s, input, weight, b, out, am);
  } else {
    launch_cudnn(s, input, weight, b, stride, padding, dilation, out, am);
  }
  return {out, argmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(lightnet_ops, CUDA, m) {
  m.impl("conv2d_relu_maxpool2d", &composite::conv_forward_op<&conv2d_relu_maxpool2d_cuda>);
}

}  // namespace cuda
}  // namespace lightnet_ops

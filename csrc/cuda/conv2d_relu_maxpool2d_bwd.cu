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
//  * grad_input / grad_weight from grad_conv, by one of two paths (choose_bwd_path below):
//    - direct, for small filters (C*R*S <= kDirectMaxCRS and K*R*S <= kDirectMaxKRS): grad_input
//      by a gather kernel (one thread per input element sums over k, r, s), grad_weight by one
//      block per weight element (and per chunk of the N*P*Q positions) reducing into float
//      partials, then a fixed-order sum over chunks (deterministic, no atomics);
//    - cudnn: ATen's convolution_backward.
//    Override: LIGHTNET_OPS_CUDA_CONV_BWD_PATH (else LIGHTNET_OPS_CUDA_CONV_PATH) = direct|cudnn.
//    LIGHTNET_OPS_CUDA_INDEX64=1 forces the direct kernels' 64-bit index variants (for tests).
#include <torch/library.h>

#include "lightnet_ops/conv2d_relu_maxpool2d.h"
#include "lightnet_ops/cuda_conv_direct.cuh"
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
// Each thread walks its positions (n, e) of the flattened N * PH * PW range by a fixed step
// without dividing per element (a 64-bit division per element dominated the kernel). With one block
// per channel it still uses only K of the SMs (6 for conv1): splitting N over blocks with a
// fixed-order second pass would be the next step.
template <typename scalar_t, int kBlock>
__global__ void __launch_bounds__(kBlock) bias_grad_kernel(const scalar_t* __restrict__ grad_out,  // (N, K, PH, PW) contiguous
                                                           const uint8_t* __restrict__ argmax,     // (N, K, PH, PW) contiguous
                                                           scalar_t* __restrict__ grad_bias,       // (K)
                                                           const int64_t N, const int64_t K, const int64_t phw) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t partial[kBlock];
  const int tid = threadIdx.x;
  const int64_t step_n = kBlock / phw;
  const int64_t step_e = kBlock % phw;
  const int64_t plane_stride = K * phw;  // elements between sample n and n + 1 of one channel
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    acc_t sum = acc_t(0);
    int64_t n = tid / phw;
    int64_t e = tid - n * phw;
    const scalar_t* g = grad_out + k * phw;
    const uint8_t* am = argmax + k * phw;
#pragma unroll 4
    for (; n < N;) {
      const int64_t off = n * plane_stride + e;
      if (am[off] != kArgmaxReluZero) sum += static_cast<acc_t>(g[off]);
      n += step_n;
      e += step_e;
      if (e >= phw) {
        e -= phw;
        ++n;
      }
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

// Largest C*R*S (grad_weight work per position) and K*R*S (grad_input work per input element)
// for the direct backward by default.
constexpr int64_t kDirectMaxCRS = 256;
constexpr int64_t kDirectMaxKRS = 256;
// The direct grad_weight aims for at least this many blocks.
constexpr int64_t kGradWeightTargetBlocks = 4096;

bool use_direct_backward(const ConvPoolShape& s) {
  // grid.x of the grad_weight kernel is K*C*R*S.
  if (!direct_fits(s) || s.K * s.C * s.R * s.S > std::numeric_limits<int32_t>::max()) return false;
  switch (forced_path(/*backward=*/true)) {
    case ForcedPath::kDirect:
      return true;
    case ForcedPath::kCudnn:
      return false;
    default:
      return s.C * s.R * s.S <= kDirectMaxCRS && s.K * s.R * s.S <= kDirectMaxKRS;
  }
}

// grad_input[n, c, ih, iw] = sum over k, r, q of grad_conv[n, k, oh, ow] * weight[k, c, r, q]
// where ih = oh * stride_h - pad_h + r * dil_h (and likewise for w). One thread per input element.
// index_t: int32_t when every flat index fits (32-bit division is several times cheaper than
// 64-bit); kUnit: stride 1 and dilation 1 (LightNet, VGG), where oh = ih + pad_h - r needs no
// division or remainder.
template <typename scalar_t, typename index_t, bool kUnit>
__global__ void conv_grad_input_direct_kernel(const scalar_t* __restrict__ grad_conv,  // (N, K, P, Q) contiguous
                                              const scalar_t* __restrict__ weight,     // (K, C, R, S) contiguous
                                              scalar_t* __restrict__ grad_input,       // (N, C, H, W) contiguous
                                              const DirectParams p) {
  using acc_t = acc_type<scalar_t>;
  const index_t hw = static_cast<index_t>(p.H) * p.W;
  const index_t chw = p.C * hw;
  const index_t total = static_cast<index_t>(p.N) * chw;
  const index_t pq = static_cast<index_t>(p.P) * p.Q;
  const index_t K = static_cast<index_t>(p.K);
  const int rs = p.R * p.S;
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t n = idx / chw;
    const index_t rem = idx - n * chw;
    const int c = static_cast<int>(rem / hw);
    const int pix = static_cast<int>(rem - c * hw);
    const int ih = pix / p.W;
    const int iw = pix - ih * p.W;
    acc_t sum = acc_t(0);
    for (index_t k = 0; k < K; ++k) {
      const scalar_t* gk = grad_conv + (n * K + k) * pq;
      const scalar_t* wkc = weight + (k * p.C + c) * rs;
      for (int r = 0; r < p.R; ++r) {
        int oh;
        if (kUnit) {
          oh = ih + p.pad_h - r;
          if (oh < 0) break;  // oh only falls as r grows
        } else {
          const int oh_num = ih + p.pad_h - r * p.dil_h;
          if (oh_num < 0 || oh_num % p.stride_h != 0) continue;
          oh = oh_num / p.stride_h;
        }
        if (oh >= p.P) continue;
        for (int q = 0; q < p.S; ++q) {
          int ow;
          if (kUnit) {
            ow = iw + p.pad_w - q;
            if (ow < 0) break;
          } else {
            const int ow_num = iw + p.pad_w - q * p.dil_w;
            if (ow_num < 0 || ow_num % p.stride_w != 0) continue;
            ow = ow_num / p.stride_w;
          }
          if (ow >= p.Q) continue;
          sum += static_cast<acc_t>(gk[oh * p.Q + ow]) * static_cast<acc_t>(wkc[r * p.S + q]);
        }
      }
    }
    grad_input[idx] = static_cast<scalar_t>(sum);
  }
}

// partial[chunk, widx] = sum over the chunk's positions (n, oh, ow) of
// grad_conv[n, k, oh, ow] * input[n, c, ih, iw] for weight element widx = ((k*C + c)*R + r)*S + q.
// grid = (K*C*R*S, chunks); positions are the flattened N*P*Q range split into equal chunks.
// index_t as for the grad_input kernel.
template <typename scalar_t, int kBlock, typename index_t>
__global__ void conv_grad_weight_direct_kernel(const scalar_t* __restrict__ grad_conv,  // (N, K, P, Q) contiguous
                                               const scalar_t* __restrict__ input,      // (N, C, H, W) contiguous
                                               acc_type<scalar_t>* __restrict__ partial,  // (chunks, K*C*R*S)
                                               const DirectParams p, const int64_t chunk_len) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t red[kBlock];
  const int tid = threadIdx.x;
  const int64_t widx = blockIdx.x;
  const int q = static_cast<int>(widx % p.S);
  int64_t t = widx / p.S;
  const int r = static_cast<int>(t % p.R);
  t /= p.R;
  const int c = static_cast<int>(t % p.C);
  const index_t k = static_cast<index_t>(t / p.C);
  const index_t pq = static_cast<index_t>(p.P) * p.Q;
  const index_t hw = static_cast<index_t>(p.H) * p.W;
  const index_t K = static_cast<index_t>(p.K);
  const index_t total = static_cast<index_t>(p.N) * pq;
  const index_t begin = static_cast<index_t>(blockIdx.y) * static_cast<index_t>(chunk_len);
  const index_t end = begin + static_cast<index_t>(chunk_len) < total ? begin + static_cast<index_t>(chunk_len) : total;
  acc_t sum = acc_t(0);
  for (index_t i = begin + tid; i < end; i += kBlock) {
    const index_t n = i / pq;
    const int pos = static_cast<int>(i - n * pq);
    const int oh = pos / p.Q;
    const int ow = pos - oh * p.Q;
    const int ih = oh * p.stride_h - p.pad_h + r * p.dil_h;
    const int iw = ow * p.stride_w - p.pad_w + q * p.dil_w;
    if (ih < 0 || ih >= p.H || iw < 0 || iw >= p.W) continue;
    sum += static_cast<acc_t>(grad_conv[(n * K + k) * pq + pos]) *
           static_cast<acc_t>(input[(n * p.C + c) * hw + ih * p.W + iw]);
  }
  red[tid] = sum;
  __syncthreads();
  for (int half = kBlock / 2; half > 0; half /= 2) {
    if (tid < half) red[tid] += red[tid + half];
    __syncthreads();
  }
  if (tid == 0) partial[static_cast<int64_t>(blockIdx.y) * gridDim.x + widx] = red[0];
}

// out[j] = sum over chunks of partial[chunk, j], in chunk order.
template <typename scalar_t>
__global__ void sum_partials_kernel(const acc_type<scalar_t>* __restrict__ partial,  // (chunks, n)
                                    scalar_t* __restrict__ out,                      // (n)
                                    const int64_t chunks, const int64_t n) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t total = acc_t(0);
    for (int64_t c = 0; c < chunks; ++c) total += partial[c * n + j];
    out[j] = static_cast<scalar_t>(total);
  }
}

// Whether every flat index of the direct backward kernels (input, grad_conv, weight) fits an
// int32_t with room for one grid-stride step (at most kMaxBlocks * kThreads = 2^28) on top.
bool direct_backward_fits_int32(const ConvPoolShape& s) {
  constexpr int64_t kLimit = int64_t{1} << 30;
  return s.N * s.C * s.H * s.W < kLimit && s.N * s.K * s.P * s.Q < kLimit && s.K * s.C * s.R * s.S < kLimit;
}

template <typename scalar_t, typename index_t>
void launch_direct_grad_input(const DirectParams& p, bool unit, const at::Tensor& grad_conv, const at::Tensor& w,
                              at::Tensor& grad_input, cudaStream_t stream) {
  const auto grid = blocks_for(grad_input.numel());
  if (unit) {
    conv_grad_input_direct_kernel<scalar_t, index_t, true><<<grid, kThreads, 0, stream>>>(
        grad_conv.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(), p);
  } else {
    conv_grad_input_direct_kernel<scalar_t, index_t, false><<<grid, kThreads, 0, stream>>>(
        grad_conv.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(), p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void direct_conv_backward(const ConvPoolShape& s, const at::Tensor& grad_conv, const at::Tensor& input,
                          const at::Tensor& weight, bool need_input, bool need_weight, at::Tensor& grad_input,
                          at::Tensor& grad_weight, cudaStream_t stream) {
  const DirectParams p = make_direct_params(s);
  // LIGHTNET_OPS_CUDA_INDEX64=1 forces the 64-bit variants (tests: no test shape needs them).
  const bool small = direct_backward_fits_int32(s) && std::strcmp(env_or_empty("LIGHTNET_OPS_CUDA_INDEX64"), "1") != 0;
  if (need_input) {
    const auto w = weight.contiguous();
    const bool unit = s.stride_h == 1 && s.stride_w == 1 && s.dil_h == 1 && s.dil_w == 1;
    grad_input = at::empty({s.N, s.C, s.H, s.W}, input.options());
    LIGHTNET_OPS_DISPATCH_CUDA_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_cuda_grad_input", [&] {
      if (small) {
        launch_direct_grad_input<scalar_t, int32_t>(p, unit, grad_conv, w, grad_input, stream);
      } else {
        launch_direct_grad_input<scalar_t, int64_t>(p, unit, grad_conv, w, grad_input, stream);
      }
    });
  }
  if (need_weight) {
    constexpr int kBlock = 256;
    const auto x = input.contiguous();
    const int64_t nweights = s.K * s.C * s.R * s.S;
    const int64_t total = s.N * s.P * s.Q;
    // Enough chunks to fill the GPU, each at least one block's worth of positions.
    const int64_t want = std::min({ceil_div(kGradWeightTargetBlocks, nweights), ceil_div(total, kBlock), kMaxGridYZ});
    const int64_t chunk_len = ceil_div(total, std::max<int64_t>(want, 1));
    const int64_t chunks = ceil_div(total, chunk_len);
    TORCH_INTERNAL_ASSERT(chunks >= 1 && chunks <= kMaxGridYZ && chunks * chunk_len >= total);
    grad_weight = at::empty({s.K, s.C, s.R, s.S}, weight.options());
    LIGHTNET_OPS_DISPATCH_CUDA_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_cuda_grad_weight", [&] {
      using acc_t = acc_type<scalar_t>;
      auto partial = at::empty({chunks, nweights}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      const dim3 grid(static_cast<unsigned int>(nweights), static_cast<unsigned int>(chunks));
      if (small) {
        conv_grad_weight_direct_kernel<scalar_t, kBlock, int32_t><<<grid, kBlock, 0, stream>>>(
            grad_conv.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(), p,
            chunk_len);
      } else {
        conv_grad_weight_direct_kernel<scalar_t, kBlock, int64_t><<<grid, kBlock, 0, stream>>>(
            grad_conv.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(), p,
            chunk_len);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_partials_kernel<scalar_t><<<blocks_for(nweights), kThreads, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<scalar_t>(), chunks, nweights);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_maxpool2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& argmax,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef pool_kernel_size,
    at::IntArrayRef pool_stride, std::array<bool, 3> output_mask) {
  constexpr const char* op = "conv2d_relu_maxpool2d_backward";
  const ConvPoolShape s = check_conv2d_relu_maxpool2d_backward(op, grad_output, input, weight, argmax, stride, padding,
                                                               dilation, pool_kernel_size, pool_stride);
  check_cuda_tensor(input, op, "input");
  check_cuda_dtype(input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Each masked-off output is its own empty tensor: outputs of an op must not alias.
  const auto empty = [&] { return at::empty({0}, input.options()); };
  at::Tensor grad_input = empty(), grad_weight = empty(), grad_bias = empty();

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
    constexpr int kBlock = 1024;  // one block per channel: LightNet has only 6 or 16 channels
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
    if (use_direct_backward(s)) {
      direct_conv_backward(s, grad_conv, input, weight, output_mask[0], output_mask[1], grad_input, grad_weight,
                           stream);
    } else {
      auto grads = at::convolution_backward(grad_conv, input, weight, std::nullopt, stride, padding, dilation, false,
                                            {0, 0}, 1, {output_mask[0], output_mask[1], false});
      if (output_mask[0]) grad_input = std::get<0>(grads);
      if (output_mask[1]) grad_weight = std::get<1>(grads);
    }
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(lightnet_ops, CUDA, m) {
  m.impl("conv2d_relu_maxpool2d_backward", &composite::conv_backward_op<&conv2d_relu_maxpool2d_backward_cuda>);
}

}  // namespace cuda
}  // namespace lightnet_ops

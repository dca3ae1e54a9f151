// CUDA kernels for linear_relu (float32, float16, bfloat16 with float32 accumulation; float64).
//
// Forward: cuBLAS GEMM with the bias folded in (at::addmm, whose CUDA implementation uses the
// cuBLASLt BIAS epilogue for a 1-D bias), then one in-place ReLU kernel that keeps NaN like stock.
// Opt-in alternative for tuning: LIGHTNET_OPS_CUDA_LINEAR_EPILOGUE=cublaslt runs
// at::_addmm_activation, whose cuBLASLt RELU_BIAS epilogue fuses the ReLU into the GEMM; it is not
// the default because cuBLASLt documents that epilogue as max(x, 0), which does not promise to
// keep NaN the way F.relu does.
// Backward: one kernel gates grad_output by !(output <= 0) (NaN passes, as in threshold_backward),
// writes the gated gradient and, when the bias gradient is wanted, per-row-chunk column partial
// sums; a second tiny kernel adds the partials of each column in a fixed order (deterministic, no
// atomics). grad_input = gated @ weight and grad_weight = gated^T @ input are cuBLAS GEMMs.
#include <torch/library.h>

#include "lightnet_ops/linear_relu.h"
#include "lightnet_ops/cuda_utils.cuh"

namespace lightnet_ops {
namespace cuda {
namespace {

template <typename scalar_t>
__global__ void relu_inplace_kernel(scalar_t* __restrict__ data, const int64_t n) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    data[i] = static_cast<scalar_t>(relu(static_cast<acc_t>(data[i])));
  }
}

constexpr int kColTile = 32;   // columns per block (one warp wide: coalesced rows)
constexpr int kRowLanes = 8;   // rows a block walks at once
// Row chunks aim for at least this many blocks in the gate kernel.
constexpr int64_t kTargetBlocks = 2048;

// Gates grad (M, Nout) by the saved output and writes it to gated; with partial != nullptr also
// writes partial[chunk, col] = sum of gated[rows of chunk, col] (accumulation type).
// grid = (ceil(Nout / kColTile), chunks), block = (kColTile, kRowLanes).
template <typename scalar_t>
__global__ void gate_colsum_kernel(const scalar_t* __restrict__ grad,    // (M, Nout) contiguous
                                   const scalar_t* __restrict__ output,  // (M, Nout) contiguous
                                   scalar_t* __restrict__ gated,         // (M, Nout) contiguous
                                   acc_type<scalar_t>* __restrict__ partial,  // (chunks, Nout) or nullptr
                                   const int64_t M, const int64_t Nout, const int64_t rows_per_chunk) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t lanes[kRowLanes][kColTile];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = row_begin + rows_per_chunk < M ? row_begin + rows_per_chunk : M;
  acc_t sum = acc_t(0);
  if (col < Nout) {
    for (int64_t r = row_begin + ty; r < row_end; r += kRowLanes) {
      const int64_t e = r * Nout + col;
      const scalar_t v = relu_passes_grad(static_cast<acc_t>(output[e])) ? grad[e] : scalar_t(0);
      gated[e] = v;
      sum += static_cast<acc_t>(v);
    }
  }
  if (partial != nullptr) {  // uniform across the block
    lanes[ty][tx] = sum;
    __syncthreads();
    if (ty == 0 && col < Nout) {
      acc_t total = acc_t(0);
      for (int i = 0; i < kRowLanes; ++i) total += lanes[i][tx];
      partial[static_cast<int64_t>(blockIdx.y) * Nout + col] = total;
    }
  }
}

// grad_bias[col] = sum over chunks of partial[chunk, col], in chunk order.
template <typename scalar_t>
__global__ void colsum_finish_kernel(const acc_type<scalar_t>* __restrict__ partial,  // (chunks, Nout)
                                     scalar_t* __restrict__ grad_bias,                // (Nout)
                                     const int64_t chunks, const int64_t Nout) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; col < Nout;
       col += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t total = acc_t(0);
    for (int64_t c = 0; c < chunks; ++c) total += partial[c * Nout + col];
    grad_bias[col] = static_cast<scalar_t>(total);
  }
}

at::Tensor linear_relu_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "linear_relu";
  check_linear_relu(op, input, weight, bias);
  check_cuda_tensor(input, op, "input");
  check_cuda_dtype(input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool has_bias = bias.has_value() && bias->defined();
  // Opt-in cuBLASLt RELU_BIAS epilogue, for non-degenerate half/bfloat16/float32 problems only.
  if (has_bias && input.scalar_type() != at::kDouble && input.size(0) > 0 && input.size(1) > 0 &&
      weight.size(0) > 0 && std::strcmp(env_or_empty("LIGHTNET_OPS_CUDA_LINEAR_EPILOGUE"), "cublaslt") == 0) {
    return at::_addmm_activation(*bias, input, weight.t(), 1, 1, /*use_gelu=*/false);
  }
  at::Tensor out = has_bias ? at::addmm(*bias, input, weight.t()) : at::mm(input, weight.t());
  if (!out.is_contiguous()) out = out.contiguous();
  const int64_t n = out.numel();
  if (n == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  LIGHTNET_OPS_DISPATCH_CUDA_TYPES(out.scalar_type(), "linear_relu_cuda_relu", [&] {
    relu_inplace_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(out.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_cuda(const at::Tensor& grad_output,
                                                                         const at::Tensor& input,
                                                                         const at::Tensor& weight,
                                                                         const at::Tensor& output,
                                                                         std::array<bool, 3> output_mask) {
  constexpr const char* op = "linear_relu_backward";
  check_linear_relu_backward(op, grad_output, input, weight, output);
  check_cuda_tensor(input, op, "input");
  check_cuda_dtype(input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const int64_t M = output.size(0);
  const int64_t Nout = output.size(1);
  const auto g = grad_output.contiguous();
  const auto o = output.contiguous();
  auto gated = at::empty({M, Nout}, input.options());
  at::Tensor grad_bias = at::empty({0}, input.options());
  if (output_mask[2]) grad_bias = M == 0 ? at::zeros({Nout}, input.options()) : at::empty({Nout}, input.options());

  if (M > 0 && Nout > 0) {
    const int64_t col_tiles = ceil_div(Nout, kColTile);
    TORCH_CHECK(col_tiles <= std::numeric_limits<int32_t>::max(), op, ": too many output features (", Nout, ")");
    // Split rows into chunks so that the grid has about kTargetBlocks blocks, each chunk at least
    // kRowLanes rows, at most kMaxGridYZ chunks.
    const int64_t want_chunks = std::max<int64_t>(1, std::min(ceil_div(kTargetBlocks, col_tiles), ceil_div(M, kRowLanes)));
    const int64_t rows_per_chunk = ceil_div(M, std::min(want_chunks, kMaxGridYZ));
    const int64_t chunks = ceil_div(M, rows_per_chunk);
    TORCH_INTERNAL_ASSERT(chunks >= 1 && chunks <= kMaxGridYZ && chunks * rows_per_chunk >= M);
    const dim3 grid(static_cast<unsigned int>(col_tiles), static_cast<unsigned int>(chunks));
    const dim3 block(kColTile, kRowLanes);
    LIGHTNET_OPS_DISPATCH_CUDA_TYPES(input.scalar_type(), "linear_relu_backward_cuda_gate", [&] {
      using acc_t = acc_type<scalar_t>;
      at::Tensor partial;
      if (output_mask[2]) {
        partial = at::empty({chunks, Nout}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      }
      gate_colsum_kernel<scalar_t><<<grid, block, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), gated.mutable_data_ptr<scalar_t>(),
          output_mask[2] ? partial.mutable_data_ptr<acc_t>() : nullptr, M, Nout, rows_per_chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (output_mask[2]) {
        colsum_finish_kernel<scalar_t><<<blocks_for(Nout), kThreads, 0, stream>>>(
            partial.const_data_ptr<acc_t>(), grad_bias.mutable_data_ptr<scalar_t>(), chunks, Nout);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  // Each masked-off output is its own empty tensor: outputs of an op must not alias.
  const auto empty = [&] { return at::empty({0}, input.options()); };
  at::Tensor grad_input = empty(), grad_weight = empty();
  if (M > 0 && Nout > 0) {
    if (output_mask[0]) grad_input = at::mm(gated, weight);
    if (output_mask[1]) grad_weight = at::mm(gated.t(), input);
  } else {
    // No gradient flows (empty batch or no output features): the gradients are zero.
    if (output_mask[0]) grad_input = at::zeros(input.sizes(), input.options());
    if (output_mask[1]) grad_weight = at::zeros(weight.sizes(), weight.options());
  }
  return {grad_input, grad_weight, output_mask[2] ? grad_bias : empty()};
}

}  // namespace

TORCH_LIBRARY_IMPL(lightnet_ops, CUDA, m) {
  m.impl("linear_relu", &linear_relu_cuda);
  m.impl("linear_relu_backward", &linear_relu_backward_cuda);
}

}  // namespace cuda
}  // namespace lightnet_ops

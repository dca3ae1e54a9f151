// Helpers shared by the CUDA kernels (csrc/cuda/*.cu): argument checks, dtype dispatch, the
// accumulation type and launch-size arithmetic. Host-side only except where marked.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "lightnet_ops/checks.h"

namespace lightnet_ops {
namespace cuda {

// float32 accumulation for float16/bfloat16/float32, float64 for float64.
template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

constexpr int kThreads = 256;
// Blocks of a grid-stride loop never exceed this; each thread then handles several elements.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;
// gridDim.y / gridDim.z limit.
constexpr int64_t kMaxGridYZ = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for a grid-stride loop over `n` (> 0) items with `threads` threads a block.
inline unsigned int blocks_for(int64_t n, int64_t threads = kThreads) {
  TORCH_INTERNAL_ASSERT(n > 0, "lightnet_ops: zero-size launch requested");
  return static_cast<unsigned int>(std::min(ceil_div(n, threads), kMaxBlocks));
}

inline bool fits_int32(int64_t v) { return v >= 0 && v <= std::numeric_limits<int32_t>::max() / 2; }

// The cuda backend's dtypes and device, after the shared argument checks (checks.h).
inline void check_cuda_dtype(const at::Tensor& t, const char* op) {
  check_backend_dtype(op, t, "cuda", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble},
                      "float32, float16, bfloat16 and float64");
}

inline void check_cuda_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor for the cuda backend, got a tensor on ",
                    t.device());
}

// Value of an environment variable used as a tuning override, or "" when unset.
inline const char* env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

}  // namespace cuda
}  // namespace lightnet_ops

// Every CUDA kernel here supports these four dtypes; accumulation type is acc_type<scalar_t>.
#define LIGHTNET_OPS_DISPATCH_CUDA_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

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

inline void check_cuda_dtype(const at::Tensor& t, const char* op) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op,
              ": the cuda backend supports float32, float16, bfloat16 and float64, got ", st,
              " (use backend=\"reference\" for other dtypes)");
}

inline void check_cuda_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor for the cuda backend, got a tensor on ",
              t.device());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but input is on ", ref.device());
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

// Per-element math shared by the CPU (C++) and CUDA kernels: output sizes, the max-pool
// selection rule, the one-byte argmax encoding and the ReLU gradient gate. Everything here is
// C10_HOST_DEVICE so the CPU tests exercise exactly what the GPU runs.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

namespace lightnet_ops {

// Argmax byte for a pooled element whose ReLU output was <= 0: its gradient is zero everywhere,
// so backward skips it. Valid window offsets are 0..kMaxPoolWindow-1.
constexpr uint8_t kArgmaxReluZero = 255;
// Largest pool window (kh * kw) whose offsets fit in a byte next to the sentinel.
constexpr int64_t kMaxPoolWindow = 255;

// Output length of a convolution / pooling along one dimension (floor mode, like PyTorch).
C10_HOST_DEVICE inline int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t padding,
                                             int64_t dilation) {
  return (in + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1;
}
C10_HOST_DEVICE inline int64_t pool_out_size(int64_t in, int64_t kernel, int64_t stride) {
  return (in - kernel) / stride + 1;
}

template <typename T>
C10_HOST_DEVICE inline bool is_nan(T v) {
  return v != v;
}

// Stock max_pool2d's selection rule, scanning the window in row-major order: a strictly greater
// value replaces the running max (so the first of equal maxima wins) and any NaN replaces it
// (so NaN propagates, and the last NaN in the window is the one selected, as in ATen).
template <typename T>
C10_HOST_DEVICE inline bool pool_takes(T candidate, T current_max) {
  return candidate > current_max || is_nan(candidate);
}

// ReLU as stock computes it: NaN stays NaN, anything <= 0 becomes 0.
template <typename T>
C10_HOST_DEVICE inline T relu(T v) {
  return (v > T(0) || is_nan(v)) ? v : T(0);
}

// Whether the gradient flows through ReLU at a point whose pre-activation (or output) is v:
// threshold_backward passes it where the output is not <= 0, which includes NaN.
template <typename T>
C10_HOST_DEVICE inline bool relu_passes_grad(T v) {
  return !(v <= T(0));
}

// Argmax byte for a pooled element: the window offset of the selected value, or the sentinel
// when ReLU zeroed it (no gradient reaches the conv output).
template <typename T>
C10_HOST_DEVICE inline uint8_t encode_argmax(T pooled_pre_relu, int64_t window_offset) {
  return relu_passes_grad(pooled_pre_relu) ? static_cast<uint8_t>(window_offset) : kArgmaxReluZero;
}

}  // namespace lightnet_ops

namespace lightnet_ops {

// The pooled positions [*first, *last] along one dimension whose windows contain conv-output
// position x (no window when *first > *last). Windows start at p * stride and span `kernel`
// positions, p in [0, pooled_size). Used by the CUDA backward to gather, rather than scatter,
// the pooled gradient: each conv-output element visits the windows that contain it.
C10_HOST_DEVICE inline void pool_windows_containing(int64_t x, int64_t kernel, int64_t stride, int64_t pooled_size,
                                                    int64_t* first, int64_t* last) {
  // Smallest p with p * stride + kernel - 1 >= x; x - kernel >= 0 in the division below.
  *first = x < kernel ? 0 : (x - kernel) / stride + 1;
  // Largest p with p * stride <= x, clamped to the last window.
  const int64_t l = x / stride;
  *last = l < pooled_size - 1 ? l : pooled_size - 1;
}

}  // namespace lightnet_ops

// Sizes and path choice shared by the direct (no cuDNN) CUDA conv kernels in
// csrc/cuda/conv2d_relu_maxpool2d_{fwd,bwd}.cu.
#pragma once

#include <cstdint>
#include <cstring>

#include "lightnet_ops/checks.h"
#include "lightnet_ops/cuda_utils.cuh"

namespace lightnet_ops {
namespace cuda {

// Sizes for the direct kernels: batch and channel counts in 64 bits, everything inside one
// image plane in 32 bits (checked on the host by direct_fits()).
struct DirectParams {
  int64_t N, K;
  int C, H, W, R, S;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int P, Q;
  int pool_kh, pool_kw, pool_sh, pool_sw;
  int PH, PW;
};

constexpr int64_t kInt32Safe = int64_t{1} << 30;

// Whether every in-plane quantity of the direct kernels fits comfortably in an int.
inline bool direct_fits(const ConvPoolShape& s) {
  // ih = oh * stride_h - pad_h + r * dil_h lies in [-pad_h, H + pad_h], and ih + pad_h - r * dil_h
  // (the backward's inverse) in [-dil_h * R, H + pad_h]; the sums below bound every
  // intermediate of the kernels' int arithmetic.
  const int64_t bounds[] = {s.C * s.R * s.S,
                            s.H * s.W,
                            s.P * s.Q,
                            s.H + 2 * s.pad_h + s.dil_h * s.R + s.stride_h,
                            s.W + 2 * s.pad_w + s.dil_w * s.S + s.stride_w,
                            s.P * s.stride_h + s.pad_h,
                            s.Q * s.stride_w + s.pad_w,
                            s.PH * s.pool_sh + s.pool_kh,
                            s.PW * s.pool_sw + s.pool_kw};
  for (const int64_t b : bounds) {
    if (b < 0 || b >= kInt32Safe) return false;
  }
  return true;
}

inline DirectParams make_direct_params(const ConvPoolShape& s) {
  DirectParams p;
  p.N = s.N;
  p.K = s.K;
  p.C = static_cast<int>(s.C);
  p.H = static_cast<int>(s.H);
  p.W = static_cast<int>(s.W);
  p.R = static_cast<int>(s.R);
  p.S = static_cast<int>(s.S);
  p.stride_h = static_cast<int>(s.stride_h);
  p.stride_w = static_cast<int>(s.stride_w);
  p.pad_h = static_cast<int>(s.pad_h);
  p.pad_w = static_cast<int>(s.pad_w);
  p.dil_h = static_cast<int>(s.dil_h);
  p.dil_w = static_cast<int>(s.dil_w);
  p.P = static_cast<int>(s.P);
  p.Q = static_cast<int>(s.Q);
  p.pool_kh = static_cast<int>(s.pool_kh);
  p.pool_kw = static_cast<int>(s.pool_kw);
  p.pool_sh = static_cast<int>(s.pool_sh);
  p.pool_sw = static_cast<int>(s.pool_sw);
  p.PH = static_cast<int>(s.PH);
  p.PW = static_cast<int>(s.PW);
  return p;
}

// Tuning/test override of the conv path: "direct", "cudnn", or anything else (unset) for the
// automatic choice. The backward reads LIGHTNET_OPS_CUDA_CONV_BWD_PATH first, then
// LIGHTNET_OPS_CUDA_CONV_PATH.
enum class ForcedPath { kAuto, kDirect, kCudnn };

inline ForcedPath forced_path(bool backward) {
  const char* v = backward ? env_or_empty("LIGHTNET_OPS_CUDA_CONV_BWD_PATH") : "";
  if (*v == '\0') v = env_or_empty("LIGHTNET_OPS_CUDA_CONV_PATH");
  if (std::strcmp(v, "direct") == 0) return ForcedPath::kDirect;
  if (std::strcmp(v, "cudnn") == 0) return ForcedPath::kCudnn;
  return ForcedPath::kAuto;
}

}  // namespace cuda
}  // namespace lightnet_ops

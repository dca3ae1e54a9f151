// Geometry and arguments of the direct (no conv-output buffer) CPU path of conv2d_relu_maxpool2d;
// the kernels themselves are in cpu_conv_kernels.h. See csrc/cpu/conv2d_relu_maxpool2d.cpp.
#pragma once

#include <cstdint>

#include "lightnet_ops/conv_params.h"

namespace lightnet_ops {
namespace cpu {

// One problem as the direct kernels see it. The per-sample input is packed into "window-shift
// planes" X[c][dy][dx][f]: plane (dy, dx) holds, for every pooled position f = ph * PW + pw, the
// input element at row ph*Mh + dy - pad_h, column pw*Mw + dx - pad_w (0 in the padding), so the
// conv value of window offset (i, j) at filter tap (r, s) for all f is plane (i*sh + r*dh,
// j*sw + s*dw): a contiguous vector.
struct Direct {
  int64_t C, K, H, W, R, S;
  int64_t pad_h, pad_w, sh, sw, dh, dw;
  int64_t pkh, pkw, psh, psw, PH, PW;
  int64_t F, Fpad;   // pooled positions per plane; rounded up to 16 lanes (a multiple of every width)
  int64_t Dy, Dx;    // input-row / input-column offsets a window reads: i*sh + r*dh, j*sw + s*dw
  int64_t Mh, Mw;    // input step between neighbouring pool windows
  int64_t KB, Kpad;  // output channels per register block; K rounded up to KB
  int64_t CRS;
  int64_t pack_elems() const { return C * Dy * Dx * Fpad; }
  int64_t plane(int64_t c, int64_t dy, int64_t dx) const { return ((c * Dy + dy) * Dx + dx) * Fpad; }
};

inline Direct make_direct(const ConvPoolShape& s, int64_t KB) {
  Direct d;
  d.C = s.C, d.K = s.K, d.H = s.H, d.W = s.W, d.R = s.R, d.S = s.S;
  d.pad_h = s.pad_h, d.pad_w = s.pad_w, d.sh = s.stride_h, d.sw = s.stride_w, d.dh = s.dil_h, d.dw = s.dil_w;
  d.pkh = s.pool_kh, d.pkw = s.pool_kw, d.psh = s.pool_sh, d.psw = s.pool_sw, d.PH = s.PH, d.PW = s.PW;
  d.F = s.PH * s.PW;
  d.Fpad = (d.F + 15) / 16 * 16;
  d.Dy = (s.pool_kh - 1) * s.stride_h + (s.R - 1) * s.dil_h + 1;
  d.Dx = (s.pool_kw - 1) * s.stride_w + (s.S - 1) * s.dil_w + 1;
  d.Mh = s.pool_sh * s.stride_h;
  d.Mw = s.pool_sw * s.stride_w;
  d.KB = KB;
  d.Kpad = (s.K + KB - 1) / KB * KB;
  d.CRS = s.C * s.R * s.S;
  return d;
}

template <typename T>
struct DirectFwdArgs {
  const Direct* d;
  const T* input;   // (N, C, H, W) contiguous
  const T* wpk;     // [Kpad / KB][C * R * S][KB]: the weights of a channel block side by side
  const T* bpk;     // [Kpad], zeros where there is no bias
  T* out;           // (N, K, PH, PW)
  uint8_t* argmax;  // (N, K, PH, PW) or null
};

template <typename T>
struct DirectBwdArgs {
  const Direct* d;
  const T* input;         // (N, C, H, W) contiguous
  const T* wpk;           // packed like DirectFwdArgs::wpk
  const T* grad_out;      // (N, K, PH, PW) contiguous
  const uint8_t* argmax;  // (N, K, PH, PW) contiguous
  T* grad_input;          // (N, C, H, W) zero-filled, or null
  bool need_weight, need_bias;
};

// Arguments of the fused bias + max-pool + ReLU pass of the ATen path.
template <typename T>
struct PoolArgs {
  const ConvPoolShape* s;
  const T* conv;    // (N, K, P, Q) contiguous, no bias
  const T* bias;    // (K) or null
  T* out;           // (N, K, PH, PW)
  uint8_t* argmax;  // (N, K, PH, PW) or null
};

}  // namespace cpu
}  // namespace lightnet_ops

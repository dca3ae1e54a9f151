// Geometry and kernel arguments of the CPU conv2d_relu_maxpool2d paths (host side, one copy for
// every instruction set); the kernels are in cpu_conv_*_kernels.h, the paths in csrc/cpu/conv_*.cpp.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "lightnet_ops/checks.h"
#include "lightnet_ops/window_math.h"

namespace lightnet_ops {
namespace cpu {

// One problem as the direct kernels see it.
//
// Packed input ("phase planes"): the padded input of one sample split by row phase a = y mod Mh
// and column phase b = x mod Mw, where Mh x Mw is the input step between neighbouring pool
// windows: Z[c][a][b][Y][X] = input[c][Y*Mh + a - pad_h][X*Mw + b - pad_w] (0 in the padding), with
// rows of PWs >= PW elements. Pooled position (ph, pw) is f = ph * PWs + pw; the input element that
// window offset (i, j) and filter tap (r, s) read for it lies at a fixed offset from f:
//   dy = i*sh + r*dh, dx = j*sw + s*dw  ->  Z[c][dy % Mh][dx % Mw] + (dy / Mh) * PWs + dx / Mw + f,
// so every conv value of every window is a dot product of contiguous vectors over f. Packing
// copies each input element once. Lanes with pw >= PW are computed and discarded.
struct Direct {
  int64_t C, K, H, W, R, S;
  int64_t pad_h, pad_w, sh, sw, dh, dw;
  int64_t pkh, pkw, psh, psw, PH, PW;
  int64_t Mh, Mw;     // input step between neighbouring pool windows (pool stride * conv stride)
  int64_t PWs, PHe;   // packed row length (PW + columns windows reach beyond) and packed rows
  int64_t Fs, Fpad;   // positions computed per plane (PH * PWs), rounded up to 16 lanes
  int64_t Zlen;       // elements per packed phase plane, including the lanes vector reads run over
  int64_t KB, Kpad;   // output channels per register block; K rounded up to KB
  int64_t CRS, WIN;   // filter taps per output channel, pool window size
  std::vector<int64_t> toff;  // [WIN][CRS]: offset in Z of tap t for window offset w (add f)
  // grad_input first accumulates into window-shift planes dX[c][dy][dx][f] (dy = i*sh + r*dh,
  // dx = j*sw + s*dw), where every (window offset, tap) pair adds at the same aligned offset f, then
  // scatters them into the input gradient.
  // The planes are then summed, per phase plane of the input (the layout of Z), with vector loads
  // at the shifts (dy / Mh) * PWs + dx / Mw, and the phase planes un-packed into the input gradient.
  // Each plane dX[c][dy][dx] starts Xmg zero lanes into its Xstride-element slot, so the shifted
  // reads (up to Xmg lanes before a plane and Lz lanes into it) only ever see zeros beyond it.
  int64_t Dy, Dx;
  int64_t Lz;               // lanes of a phase plane the sums cover: PHe * PWs rounded up to 16
  int64_t Xmg, Xstride;     // zero margin before each dX plane, and the distance between planes
  std::vector<int64_t> xoff;  // [WIN][CRS]: start of the pair's plane in dX
  int64_t dx_elems() const { return C * Dy * Dx * Xstride; }
  std::vector<int64_t> pooled;  // [Fpad]: pooled index ph * PW + pw of packed position f, or -1
  int64_t pack_elems() const { return C * Mh * Mw * Zlen; }
  int64_t grad_elems() const { return WIN * Kpad * Fpad; }
};

inline Direct make_direct(const ConvPoolShape& s, int64_t KB) {
  Direct d;
  d.C = s.C, d.K = s.K, d.H = s.H, d.W = s.W, d.R = s.R, d.S = s.S;
  d.pad_h = s.pad_h, d.pad_w = s.pad_w, d.sh = s.stride_h, d.sw = s.stride_w, d.dh = s.dil_h, d.dw = s.dil_w;
  d.pkh = s.pool_kh, d.pkw = s.pool_kw, d.psh = s.pool_sh, d.psw = s.pool_sw, d.PH = s.PH, d.PW = s.PW;
  d.Mh = s.pool_sh * s.stride_h;
  d.Mw = s.pool_sw * s.stride_w;
  const int64_t Dy = (s.pool_kh - 1) * s.stride_h + (s.R - 1) * s.dil_h + 1;  // rows a window reads
  const int64_t Dx = (s.pool_kw - 1) * s.stride_w + (s.S - 1) * s.dil_w + 1;
  d.PWs = s.PW + (Dx - 1) / d.Mw;
  d.PHe = s.PH + (Dy - 1) / d.Mh;
  d.Fs = s.PH * d.PWs;
  d.Fpad = (d.Fs + 15) / 16 * 16;
  const int64_t reach = (Dy - 1) / d.Mh * d.PWs + (Dx - 1) / d.Mw + d.Fpad;
  d.Zlen = (std::max(d.PHe * d.PWs, reach) + 15) / 16 * 16;
  d.KB = KB;
  d.Kpad = (s.K + KB - 1) / KB * KB;
  d.CRS = s.C * s.R * s.S;
  d.WIN = s.pool_kh * s.pool_kw;
  d.Dy = Dy, d.Dx = Dx;
  d.Lz = (d.PHe * d.PWs + 15) / 16 * 16;
  d.Xmg = ((Dy - 1) / d.Mh * d.PWs + (Dx - 1) / d.Mw + 15) / 16 * 16;
  d.Xstride = d.Xmg + std::max(d.Fpad, d.Lz);
  d.pooled.assign(d.Fpad, -1);
  for (int64_t ph = 0; ph < s.PH; ++ph)
    for (int64_t pw = 0; pw < s.PW; ++pw) d.pooled[ph * d.PWs + pw] = ph * s.PW + pw;
  d.toff.resize(d.WIN * d.CRS);
  d.xoff.resize(d.WIN * d.CRS);
  for (int64_t i = 0; i < s.pool_kh; ++i)
    for (int64_t j = 0; j < s.pool_kw; ++j)
      for (int64_t c = 0; c < s.C; ++c)
        for (int64_t r = 0; r < s.R; ++r)
          for (int64_t t = 0; t < s.S; ++t) {
            const int64_t dy = i * s.stride_h + r * s.dil_h, dx = j * s.stride_w + t * s.dil_w;
            const int64_t idx = (i * s.pool_kw + j) * d.CRS + (c * s.R + r) * s.S + t;
            d.toff[idx] = ((c * d.Mh + dy % d.Mh) * d.Mw + dx % d.Mw) * d.Zlen + dy / d.Mh * d.PWs + dx / d.Mw;
            d.xoff[idx] = ((c * Dy + dy) * Dx + dx) * d.Xstride + d.Xmg;
          }
  return d;
}

// make_direct's geometry for this shape (at any batch size, which it does not depend on) and channel
// block, from a small per-thread cache: building the offset tables costs about a microsecond, as
// much as a batch-1 kernel of a small layer. Four entries hold a network's conv layers (LightNet's
// two forward and two backward shapes) without evicting each other.
inline std::shared_ptr<const Direct> cached_direct(const ConvPoolShape& s, int64_t KB) {
  struct Entry {
    ConvPoolShape key;
    int64_t KB = 0;
    std::shared_ptr<const Direct> d;
  };
  thread_local std::array<Entry, 4> entries;
  thread_local size_t next = 0;
  static_assert(std::has_unique_object_representations_v<ConvPoolShape>, "keys are compared bytewise");
  ConvPoolShape key = s;
  key.N = 0;
  for (const Entry& e : entries) {
    if (e.d && e.KB == KB && std::memcmp(&e.key, &key, sizeof(key)) == 0) return e.d;
  }
  auto d = std::make_shared<const Direct>(make_direct(s, KB));
  entries[next] = Entry{key, KB, d};
  next = (next + 1) % entries.size();
  return d;
}

// Whether the direct path's packed input stays about the size of the padded input, which it is
// for any stride and pool stride within the image. It holds C * Mh * Mw phase planes of at least
// 16 lanes each (Mh x Mw = stride * pool stride), so a valid stride or pool stride far beyond the
// image (2^32, say) asks for astronomically many: such shapes take a path that allocates nothing per
// stride. Computed in 128 bits with every product saturating at 2^62. Mirrors make_direct's sizes.
inline bool direct_packing_fits(const ConvPoolShape& s) {
  using i128 = __int128;
  constexpr i128 kCap = i128(1) << 62;
  const auto cap = [&](i128 v) { return v < kCap ? v : kCap; };
  const auto mul = [&](i128 a, i128 b) { return cap(cap(a) * cap(b)); };
  const auto add = [&](i128 a, i128 b) { return cap(cap(a) + cap(b)); };
  const auto up16 = [&](i128 v) { return cap((v + 15) / 16 * 16); };
  const i128 Mh = mul(s.pool_sh, s.stride_h), Mw = mul(s.pool_sw, s.stride_w);
  const i128 Dy = add(add(mul(s.pool_kh - 1, s.stride_h), mul(s.R - 1, s.dil_h)), 1);
  const i128 Dx = add(add(mul(s.pool_kw - 1, s.stride_w), mul(s.S - 1, s.dil_w)), 1);
  const i128 PWs = add(s.PW, (Dx - 1) / Mw), PHe = add(s.PH, (Dy - 1) / Mh);
  const i128 Fpad = up16(mul(s.PH, PWs));
  const i128 reach = add(add(mul((Dy - 1) / Mh, PWs), (Dx - 1) / Mw), Fpad);
  const i128 Zlen = up16(std::max(mul(PHe, PWs), reach));
  const i128 pack = mul(mul(s.C, mul(Mh, Mw)), Zlen);
  const i128 padded_input = mul(mul(add(s.H, mul(2, s.pad_h)), add(s.W, mul(2, s.pad_w))), s.C);
  return pack <= add(mul(4, padded_input), i128(1) << 16);
}

template <typename T>
struct DirectFwdArgs {
  const Direct* d;
  const T* input;   // (N, C, H, W) contiguous
  const T* wpk;     // [Kpad / KB][C * R * S][KB]: the weights of a channel block side by side
  const T* bpk;     // [Kpad], zeros where there is no bias
  T* out;           // (N, K, PH, PW)
  uint8_t* argmax;  // (N, K, PH, PW) or null
  // Winograd variant only (3x3 filter, stride 1, dilation 1, 2x2 pool with stride 2):
  // U[k][c][xi] = (G g G^T)[xi] for the filter g of (k, c), and the bias per output channel.
  const T* wino_u = nullptr;
  const T* bias = nullptr;  // (K) or null
  // Counts the samples the Winograd variant hands to the direct kernel (non-finite values), or null.
  std::atomic<int64_t>* fallback_samples = nullptr;
};

template <typename T>
struct DirectBwdArgs {
  const Direct* d;
  const T* input;         // (N, C, H, W) contiguous
  const T* wpk;           // packed like DirectFwdArgs::wpk
  const T* grad_out;      // (N, K, PH, PW) contiguous
  const uint8_t* argmax;  // (N, K, PH, PW) contiguous
  T* grad_input;          // (N, C, H, W) uninitialised (each sample is zeroed, then written), or null
  bool need_weight, need_bias;
  // grad_input by the Winograd adjoint when set (shapes as for DirectFwdArgs::wino_u; same layout).
  const T* wino_u = nullptr;
  // Counts the samples whose grad_input the direct kernel computes instead (no Winograd weights, or
  // non-finite values), or null.
  std::atomic<int64_t>* fallback_samples = nullptr;
};

// Lanes kept per entry of the direct backward's partial weight / bias gradients (the widest
// vector): lanes are summed once per batch chunk, not once per sample.
constexpr int64_t kPartialLanes = 16;

// Arguments of the fused bias + max-pool + ReLU pass of the ATen path.
template <typename T>
struct PoolArgs {
  const ConvPoolShape* s;
  const T* conv;    // (N, K, P, Q) contiguous, no bias
  const T* bias;    // (K) or null
  T* out;           // (N, K, PH, PW)
  uint8_t* argmax;  // (N, K, PH, PW) or null
};

// Conv-position offset (row, column) of each argmax byte from its pool window's corner, -1 for
// bytes that route nothing (ReLU-zeroed, or outside the window): a table, because a division per
// element costs more than the rest of the element's bookkeeping.
struct ArgmaxOffsets {
  int16_t dy[256], dx[256];
  explicit ArgmaxOffsets(const ConvPoolShape& s) {
    for (int a = 0; a < 256; ++a) {
      const bool live = a != kArgmaxReluZero && a < s.pool_kh * s.pool_kw;
      dy[a] = live ? static_cast<int16_t>(a / s.pool_kw) : int16_t(-1);
      dx[a] = live ? static_cast<int16_t>(a % s.pool_kw) : int16_t(-1);
    }
  }
};

// Arguments of the scatter backward. Channels are innermost (channels-last, not padded), so the S
// taps of one filter row at one conv position read Ls = ((S - 1) * dil_w + 1) * C consecutive
// elements of a padded input row: a "span". The kernels handle each filter row as whole vectors
// over its span; lanes between dilated taps or past the span's end are computed and discarded
// (grad_weight) or add zero (grad_input: the weight spans hold zeros there). The buffers carry
// slack past their ends for the vectors that run over.
template <typename T>
struct ScatterArgs {
  const ConvPoolShape* s;
  int64_t Ls, Lp;          // span length, and the span stride in w_t / gw_t (a multiple of 64 bytes)
  int64_t row;             // elements per padded input row: (W + 2 * pad_w) * C
  const T* x_t;            // input as (N, H + 2 * pad_h, W + 2 * pad_w, C), zeros in the conv padding, then
                           // 64 bytes of zeros; or null when grad_weight is not needed
  const T* w_t;            // weight spans (K, R, Lp): w_t[k][r][s * dil_w * C + c] = weight[k][c][r][s], zeros
                           // elsewhere; or null when grad_input is not needed
  const T* grad_out;       // (N, K, PH, PW)
  const uint8_t* argmax;   // (N, K, PH, PW)
  T* gi_t;                 // grad_input as N blocks of gi_stride elements, each (H + 2 * pad_h, W + 2 * pad_w,
                           // C) and slack; uninitialised (zeroed per sample); or null
  int64_t gi_stride;
  T* gw_t;                 // grad_weight spans (K, R, Lp), the first Ls elements of each span written (the
                           // kernel's vectors cover ceil(Ls / V) * V <= Lp); or null
  const ArgmaxOffsets* offsets;
};

// Arguments of the span grad_weight of the direct path (few channels; see ScatterArgs for spans).
// Per sample the kernel lays the input out as one span per padded input position (y, x) (the Ls
// channels-last elements a filter row starting there reads), each in its own Lp-element,
// 64-byte-aligned row: every vector load of the sweep is aligned.
template <typename T>
struct SpanGradWeightArgs {
  const ConvPoolShape* s;
  int64_t Ls, Lp;
  int64_t Xn;               // span start columns per padded row: W + 2 * pad_w - (S - 1) * dil_w
  const T* input;           // (N, C, H, W) contiguous
  const T* grad_out;        // (N, K, PH, PW)
  const uint8_t* argmax;    // (N, K, PH, PW)
  // The offset in the span rows of the conv position that pooled position f selects with argmax
  // byte b is pos_base[f] + byte_off[b] where byte_live[b] (1: a window offset; 0: the ReLU
  // sentinel or out of range, no conv position).
  const int64_t* pos_base;  // [PH * PW]
  const int64_t* byte_off;  // [256]
  const int64_t* byte_live; // [256]
};

// Arguments of the Winograd F(2x2, 3x3) forward (ATen path; 3x3 filter, stride 1, dilation 1,
// 2x2 pool with stride 2): each 2x2 pool window is one Winograd output tile, so the output
// transform yields the window's four conv values together. Tile t = ph * PW + pw of sample n.
template <typename T>
struct WinogradArgs {
  const ConvPoolShape* s;
  int64_t Cp, Kp;      // channels / output channels padded to a multiple of 64 bytes
  const T* x_t;        // input as (N, H + 2 * pad_h, W + 2 * pad_w, Cp), zeros in the padding
  const T* bias;       // (K) or null
  T* out;              // (N, K, PH, PW)
  uint8_t* argmax;     // (N, K, PH, PW) or null
};

}  // namespace cpu
}  // namespace lightnet_ops

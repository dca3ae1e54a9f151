// The paths of the CPU conv2d_relu_maxpool2d, one translation unit each (csrc/cpu/conv_*.cpp), as
// the op's entry points (csrc/cpu/conv2d_relu_maxpool2d.cpp) call them once the plan
// (cpu_conv_plan.h) has chosen; and the host-side helpers several of them share.
//
// Every path gives the same argmax semantics (stock's row-major first-maximum rule, NaN wins, bias
// added before comparing) and is deterministic: partial sums are kept over fixed splits of the
// work (independent of the thread count) and reduced in a fixed order.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <functional>
#include <tuple>
#include <vector>

#include "lightnet_ops/conv2d_relu_maxpool2d.h"
#include "lightnet_ops/cpu_conv_args.h"
#include "lightnet_ops/cpu_conv_plan.h"

namespace lightnet_ops {
namespace cpu {

using ConvGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// conv_direct_forward.cpp. Direct path, no conv output materialised: per sample, the input is
// packed once into window-shift phase planes (see Direct), and every conv value of every pool
// window is a dot product of contiguous vectors; a register block of output channels keeps the
// running max and its window offset and writes only the pooled value and the byte argmax.
// Contiguous input / weight; finite weights. Returns what ran (the Winograd variant hands
// overflowing weights to the direct kernel for the call, non-finite samples per sample).
ConvForwardRun run_direct_forward(const ConvPoolShape& s, const ConvForwardPlan& plan, const at::Tensor& input,
                              const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out, at::Tensor& argmax,
                              bool need_argmax);

// The direct path's forward prepared for one call (weights packed, Winograd weights transformed,
// kernel chosen), for a caller that splits the samples itself: run(begin, end) computes samples
// [begin, end) on the calling thread, from any thread, in any order. run_direct_forward is this and
// a parallel_for over the samples; convnet_forward's inference (csrc/convnet.cpp) runs several
// layers' forwards sample by sample in one parallel region. input / weight / bias (contiguous),
// out and argmax must outlive it.
class DirectForward {
 public:
  DirectForward(const ConvPoolShape& s, const ConvForwardPlan& plan, const at::Tensor& input, const at::Tensor& weight,
                const at::Tensor& bias, at::Tensor& out, at::Tensor& argmax, bool need_argmax);
  void run(int64_t begin, int64_t end) const { samples_(begin, end); }
  // What ran, once every sample has.
  ConvForwardRun result() const;

 private:
  ConvForwardRun run_;
  std::function<void(int64_t, int64_t)> samples_;
  std::function<int64_t()> fallback_samples_;
};

// conv_winograd_forward.cpp. ATen path, Winograd F(2x2, 3x3): each 2x2 / stride-2 pool window is
// one output tile; 16 GEMMs per block of tiles, the pool fused into the output transform. Returns
// false when a weight, input or conv value is not finite (out / argmax are then partly written and
// the caller recomputes them with run_aten_conv_forward).
bool run_aten_winograd_forward(const ConvPoolShape& s, const ConvForwardPlan& plan, const at::Tensor& input,
                           const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out, at::Tensor& argmax,
                           bool need_argmax);

// conv_aten_forward.cpp. ATen path: ATen's convolution (oneDNN) without bias, in batch chunks,
// each followed by one fused pass adding the bias, max-pooling, applying ReLU and writing output
// and argmax while the chunk's conv output is in cache.
void run_aten_conv_forward(const ConvPoolShape& s, const ConvForwardPlan& plan, const at::Tensor& input,
                       const at::Tensor& weight, const at::Tensor& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, at::Tensor& out, at::Tensor& argmax,
                       bool need_argmax);

// conv_aten_forward.cpp. Whether every element of t (float32 / float64) is finite: the
// instruction set's vectorised scan, split across threads above 64K elements.
bool tensor_is_finite(const at::Tensor& t, Isa isa);

// conv_direct_backward.cpp. Direct path: the pooled gradient, masked per window offset by the
// argmax (ReLU-zeroed elements carry the sentinel and drop out), is contracted with the packed
// input for grad_weight (or, span kernel, only the live elements' patches) and spread back through
// the same planes (or the Winograd adjoint) for grad_input. Contiguous operands, finite where the
// plan required. Fills run's input_grad / fallback_samples.
ConvGrads run_direct_backward(const ConvPoolShape& s, const ConvBackwardPlan& plan, const at::Tensor& grad_output,
                          const at::Tensor& input, const at::Tensor& weight, const at::Tensor& argmax,
                          std::array<bool, 3> output_mask, ConvBackwardRun& run);

// conv_scatter_backward.cpp. From the live pooled elements only, channels-last and vectorised over
// input channels: grad_weight sums gradient * the input patch each element's conv position read,
// grad_input adds gradient * filter into that patch. Contiguous grad_output / argmax.
ConvGrads run_scatter_backward(const ConvPoolShape& s, const ConvBackwardPlan& plan, const at::Tensor& grad_output,
                           const at::Tensor& input, const at::Tensor& weight, const at::Tensor& argmax,
                           std::array<bool, 3> output_mask);

// conv_dense_backward.cpp. Routes the pooled gradient into a dense conv-output gradient and calls
// ATen's convolution_backward: stock's arithmetic, for operands the sparse paths would treat
// differently (non-finite values) and for shapes they do not take.
ConvGrads run_dense_backward(const ConvPoolShape& s, const at::Tensor& grad_output, const at::Tensor& input,
                         const at::Tensor& weight, const at::Tensor& argmax, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> output_mask);

// ------------------------------------------------------------------------------------------------
// Helpers shared by several paths
// ------------------------------------------------------------------------------------------------

// The span geometry of the scatter backward and the span grad_weight (see ScatterArgs): span
// length, and its stride rounded up to 64 bytes so that every instruction set's vectors fit in it.
struct SpanGeometry {
  int64_t Sd, Ls, Lp, Hp, Wp;
  SpanGeometry(const ConvPoolShape& s, int64_t elem_size) {
    const int64_t lanes = 64 / elem_size;
    Sd = (s.S - 1) * s.dil_w + 1;
    Ls = Sd * s.C;
    Lp = (Ls + lanes - 1) / lanes * lanes;
    Hp = s.H + 2 * s.pad_h;
    Wp = s.W + 2 * s.pad_w;
  }
  // (K, R, Lp) spans -> the (K, R, Sd, C) view of their taps' columns, (K, R, S, C) with dilation.
  at::Tensor taps(const at::Tensor& spans, const ConvPoolShape& s) const {
    return spans.narrow(2, 0, Ls).view({s.K, s.R, Sd, s.C}).slice(2, 0, Sd, s.dil_w);
  }
};

// Winograd F(2x2, 3x3) weight transform: at(xi, c, k) = (G g G^T)[xi] for the 3x3 filter g of
// (k, c) of the contiguous (K, C, 3, 3) weights w. Returns whether every value is finite.
template <typename T, typename At>
bool winograd_weights(const ConvPoolShape& s, const T* w, At&& at) {
  T finite_check = 0;
  for (int64_t k = 0; k < s.K; ++k) {
    for (int64_t c = 0; c < s.C; ++c) {
      const T* g = w + (k * s.C + c) * 9;
      T gg[4][3];  // G g
      for (int q = 0; q < 3; ++q) {
        gg[0][q] = g[q];
        gg[1][q] = (g[q] + g[3 + q] + g[6 + q]) * T(0.5);
        gg[2][q] = (g[q] - g[3 + q] + g[6 + q]) * T(0.5);
        gg[3][q] = g[6 + q];
      }
      for (int r = 0; r < 4; ++r) {  // (G g) G^T
        const T v[4] = {gg[r][0], (gg[r][0] + gg[r][1] + gg[r][2]) * T(0.5),
                        (gg[r][0] - gg[r][1] + gg[r][2]) * T(0.5), gg[r][2]};
        for (int q = 0; q < 4; ++q) {
          at(r * 4 + q, c, k) = v[q];
          finite_check += v[q] - v[q];
        }
      }
    }
  }
  return finite_check == T(0);
}

// The direct path's Winograd weights, [K][C][16] (see DirectFwdArgs::wino_u), from contiguous
// weights; empty if a transformed value is not finite.
template <typename T>
std::vector<T> direct_winograd_weights(const ConvPoolShape& s, const at::Tensor& weight) {
  std::vector<T> u(s.K * s.C * 16);
  const bool finite = winograd_weights<T>(s, weight.const_data_ptr<T>(), [&](int64_t xi, int64_t c, int64_t k) -> T& {
    return u[(k * s.C + c) * 16 + xi];
  });
  return finite ? u : std::vector<T>();
}

// Weights (K, C, R, S) -> [Kpad / KB][C * R * S][KB] (zeros for the padded channels); bias -> [Kpad].
template <typename T>
void pack_weight(const Direct& d, const T* w, const T* bias, T* wpk, T* bpk) {
  for (int64_t k = 0; k < d.Kpad; ++k) {
    const int64_t kb = k / d.KB, q = k % d.KB;
    for (int64_t t = 0; t < d.CRS; ++t) wpk[(kb * d.CRS + t) * d.KB + q] = k < d.K ? w[k * d.CRS + t] : T(0);
    if (bpk) bpk[k] = (k < d.K && bias) ? bias[k] : T(0);
  }
}

// grad_bias[k] += sum over n of plane_sums[n][k], in batch order (deterministic).
template <typename T>
void add_plane_sums_in_batch_order(const ConvPoolShape& s, const std::vector<T>& plane_sums, T* grad_bias) {
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t k = 0; k < s.K; ++k) grad_bias[k] += plane_sums[n * s.K + k];
  }
}

}  // namespace cpu
}  // namespace lightnet_ops

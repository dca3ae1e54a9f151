// CPU kernels for conv2d_relu_maxpool2d (float32, float64).
//
// Two paths, chosen per call by `use_direct` (heuristic and measurements there):
//
// * Direct (small channel counts, e.g. LightNet): no conv output is ever materialised. Per sample,
//   the input is packed once into "window-shift planes" X[c][dy][dx][f]: for every offset (dy, dx)
//   that a (pool-window offset, filter tap) pair reads, the input sampled at that offset for each
//   pooled position f = ph * PW + pw (zero where the read falls into the conv padding). Then every
//   conv value of every pool window is a dot product of contiguous vectors, so the kernel computes
//   a vector of pooled positions for a block of output channels in registers, keeps the running
//   max and its window offset, and writes only the pooled value and the byte argmax.
//   Backward reuses the packing: the pooled gradient, masked per window offset by the argmax
//   (ReLU-zeroed elements carry the sentinel and drop out), is contracted with X for grad_weight
//   and spread back through the same planes (then un-packed) for grad_input. Each pooled element
//   feeds exactly the one conv position it selected, so no dense conv-output gradient exists.
// * ATen (large channel counts, e.g. VGG blocks): ATen's convolution (oneDNN) without bias, in
//   batch chunks, each followed by one fused pass adding the bias, max-pooling, applying ReLU and
//   writing output + argmax. Backward ("scatter", use_scatter_backward): from the live pooled
//   elements only, vectorised over input channels -- grad_weight sums gradient * the input patch
//   each element's conv position read, grad_input adds gradient * filter into that patch. With
//   few input channels, or non-finite operands, it routes the pooled gradient into a dense
//   conv-output gradient and calls ATen's convolution_backward instead.
//
// All paths give the same argmax semantics (stock's row-major first-maximum rule, NaN wins,
// bias added before comparing) and are deterministic: the direct backward accumulates the weight
// and bias gradients in per-chunk partial sums over a fixed split of the batch (independent of
// the thread count), reduced in chunk order; the scatter backward sums each grad_weight row and
// each sample's grad_input on one thread in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "lightnet_ops/composite.h"
#include "lightnet_ops/conv_params.h"
#include "lightnet_ops/cpu_conv_direct.h"
#include "lightnet_ops/cpu_simd.h"

#if defined(__GNUC__) && !defined(__clang__)
// 64-byte vector arguments only ever appear inside inlined helpers; GCC's ABI note is irrelevant.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#if LIGHTNET_OPS_X86_DISPATCH
#include <immintrin.h>  // intrinsics used only inside the AVX2 / AVX-512 target regions
#endif

// The kernel bodies, once per instruction set (see cpu_simd.h).
#define LIGHTNET_OPS_KERNELS_HEADER "lightnet_ops/cpu_conv_kernels.h"
#include "lightnet_ops/cpu_isa_variants.h"

namespace lightnet_ops {
namespace {

using cpu::Direct;
using cpu::DirectBwdArgs;
using cpu::DirectFwdArgs;
using cpu::Isa;
using cpu::PoolArgs;
using cpu::ScatterArgs;

void check_cpu_dtype(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
              ": the cpu backend supports float32 and float64, got ", t.scalar_type(),
              " (use backend=\"reference\" for other dtypes)");
}

template <typename T>
using FwdFn = void (*)(const DirectFwdArgs<T>&, int64_t, int64_t);
template <typename T>
using BwdFn = void (*)(const DirectBwdArgs<T>&, int64_t, int64_t, T*, T*);
template <typename T>
using PoolFn = void (*)(const PoolArgs<T>&, int64_t, int64_t);
template <typename T>
using FiniteFn = bool (*)(const T*, int64_t);
template <typename T>
using ScatterFn = void (*)(const ScatterArgs<T>&, int64_t, int64_t);
template <typename T>
using SpanGwFn = void (*)(const cpu::SpanGradWeightArgs<T>&, int64_t, int64_t, T*);
template <typename T>
using WinogradInFn = bool (*)(const cpu::WinogradArgs<T>&, int64_t, int64_t, int64_t, T*);
template <typename T>
using WinogradOutFn = bool (*)(const cpu::WinogradArgs<T>&, int64_t, int64_t, int64_t, const T*);

template <typename T>
struct Kernels {
  FwdFn<T> fwd;
  FwdFn<T> fwd_winograd;             // direct path, 3x3 filter and 2x2 / stride-2 pool only
  BwdFn<T> bwd;
  PoolFn<T> pool;
  FiniteFn<T> finite;
  ScatterFn<T> scatter_grad_weight;  // over output channels
  ScatterFn<T> scatter_grad_input;   // over samples
  SpanGwFn<T> span_grad_weight;      // over samples, into a partial sum
  WinogradInFn<T> winograd_input;    // per block of pooled rows of a sample
  WinogradOutFn<T> winograd_output;  // likewise
};

#define LIGHTNET_OPS_KERNELS(ns, KB)                                                                  \
  Kernels<T> {                                                                                      \
    &cpu::ns::direct_forward_range<T, KB>, &cpu::ns::direct_winograd_forward_range<T, KB>,          \
        &cpu::ns::direct_backward_range<T, KB>,                                                     \
        &cpu::ns::bias_relu_pool_range<T>, &cpu::ns::all_finite<T>,                                 \
        &cpu::ns::scatter_grad_weight_range<T>, &cpu::ns::scatter_grad_input_range<T>,              \
        &cpu::ns::span_grad_weight_range<T>,                                                        \
        &cpu::ns::winograd_input_transform<T>, &cpu::ns::winograd_output_pool<T>                    \
  }

// Output channels per register block of the direct forward. AVX-512 has 32 vector registers: 8
// channels (accumulator, running max and argmax each) fit. GCC 12 keeps the 8-channel accumulators
// in registers but spills the 4- and 6-channel variants to the stack (seen in the disassembly;
// about 3x slower), so AVX-512 uses 8 even for K = 6 (a third of the lanes padded, still faster).
// Narrower targets (16 registers) use 4.
int64_t channel_block(Isa isa) { return isa == Isa::kAvx512 ? 8 : 4; }

// Output channels per register block of the direct backward, whose blocks hold only gradient
// sums (KB x 3 taps): on AVX-512 the 6-channel variant stays in registers too, and it is chosen
// where it pads fewer channels than 8 (LightNet conv1, K = 6: backward at batch 64 80 vs 90-106 us
// on a 2-core AVX-512 EPYC).
int64_t backward_channel_block(Isa isa, int64_t K) {
  if (isa != Isa::kAvx512) return 4;
  const auto padded = [K](int64_t kb) { return (K + kb - 1) / kb * kb; };
  return padded(6) < padded(8) ? 6 : 8;
}

// The kernels for this CPU (and LIGHTNET_OPS_CPU_ISA) with channel block KB (8, 6 or 4 on AVX-512).
template <typename T>
Kernels<T> kernels(Isa isa, int64_t KB) {
#if LIGHTNET_OPS_X86_DISPATCH
  if (isa == Isa::kAvx512) {
    if (KB == 8) return LIGHTNET_OPS_KERNELS(isa_avx512, 8);
    return KB == 6 ? LIGHTNET_OPS_KERNELS(isa_avx512, 6) : LIGHTNET_OPS_KERNELS(isa_avx512, 4);
  }
  if (isa == Isa::kAvx2) return LIGHTNET_OPS_KERNELS(isa_avx2, 4);
#endif
  (void)isa;
  (void)KB;
  return LIGHTNET_OPS_KERNELS(isa_default, 4);
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

// Path choice. The direct kernel recomputes nothing for non-overlapping pools and spends
// C*R*S*KB multiply-adds per vector load, but it has no cache blocking over the packed input,
// which is C*Dy*Dx*F elements per sample (16x the pooled plane per channel for a 3x3 filter and a
// 2x2 pool), and it reads each packed plane once per channel block. oneDNN is far better at large
// C*R*S and large planes, far worse at LightNet's 1 and 6 input channels. Measured on a 2-core
// AVX-512 EPYC (python -m lightnet_ops.bench --cases conv1_b64 conv2_b64 vgg_b8, once with each
// LIGHTNET_OPS_CPU_CONV_PATH): LightNet conv1 (C*R*S = 9) and conv2 (54) are several times faster
// direct; the VGG block (C*R*S = 576, 64 channels, 56x56) is faster through oneDNN.
// Overlapping pool windows (stride < window) make the direct path recompute conv values
// (window area / stride area times), so their budget shrinks by that factor.
// LIGHTNET_OPS_CPU_CONV_PATH=direct|aten overrides the choice (tests cover both paths with it).
bool use_direct(const ConvPoolShape& s, int64_t elem_size) {
  if (const int forced = cpu::env_choice("LIGHTNET_OPS_CPU_CONV_PATH", "direct", "aten"); forced >= 0) return forced == 1;
  // Packed input per sample: about the padded input (phase planes) plus a few vector tails.
  const int64_t pack_bytes = s.C * (s.H + 2 * s.pad_h + 16) * (s.W + 2 * s.pad_w) * elem_size;
  const double recompute =
      double(s.pool_kh * s.pool_kw) / double(std::min(s.pool_kh, s.pool_sh) * std::min(s.pool_kw, s.pool_sw));
  return double(s.C * s.R * s.S) * recompute <= 256.0 && pack_bytes <= (1 << 20);
}

// ------------------------------------------------------------------------------------------------
// ATen path
// ------------------------------------------------------------------------------------------------

// Samples per chunk of the ATen-path forward: chunks whose conv output is at most about 4 MiB,
// balanced, and at least one sample per thread so that oneDNN keeps every thread busy. Chunks keep
// the forward's peak memory at one chunk's conv output (VGG block, B8, 64->64, 56x56: 7.8 MiB
// instead of 13.9 MiB) and pool each chunk while it is in cache. Speed is the same on the 2-core
// EPYC (8.7 ms for chunks of 4 samples or the whole batch) once glibc's allocator keeps freed
// multi-MB blocks; while it still returns them to the system (its adaptive mmap / trim
// thresholds, which depend on what the process allocated before), every call page-faults its
// fresh buffers and both take 15-17 ms, whatever the chunk size.
// LIGHTNET_OPS_CPU_ATEN_CHUNK=n overrides the samples per chunk (tests use it to get several chunks
// from small shapes).
int64_t aten_forward_chunk(const ConvPoolShape& s, int64_t elem_size) {
  if (const char* env = std::getenv("LIGHTNET_OPS_CPU_ATEN_CHUNK")) {
    const int64_t n = std::atoll(env);
    if (n > 0) return n;
  }
  const int64_t sample_bytes = std::max<int64_t>(1, s.K * s.P * s.Q * elem_size);
  const int64_t per = std::max<int64_t>({int64_t(at::get_num_threads()), (int64_t(4) << 20) / sample_bytes, 1});
  const int64_t chunks = (s.N + per - 1) / per;
  return std::max<int64_t>(1, (s.N + chunks - 1) / chunks);
}

// Scatters the pooled gradient (N, K, PH, PW) through the argmax into the conv-output gradient
// (N, K, P, Q), writing every element of it (zeros where nothing routes), and, if plane_sums is
// not null, the sum of what each (n, k) plane received (the bias gradient before the sum over the
// batch). One pass per plane while it is in cache, instead of zero-fill, scatter and a separate
// reduction over the dense gradient. Planes are independent, so overlapping windows (pool stride
// < pool window) accumulate without races. Bytes outside the window (not written by the forward,
// e.g. an argmax from another pool configuration) route nothing instead of writing out of bounds.
template <typename scalar_t>
void route_grad(const ConvPoolShape& s, const scalar_t* grad_out, const uint8_t* argmax, scalar_t* grad_conv,
                scalar_t* plane_sums) {
  // Offset of each argmax byte's position from its window's corner in the conv-output plane, -1
  // for bytes that route nothing.
  const cpu::ArgmaxOffsets window(s);
  int64_t offset[256];
  for (int a = 0; a < 256; ++a) offset[a] = window.dy[a] < 0 ? -1 : window.dy[a] * s.Q + window.dx[a];
  at::parallel_for(0, s.N * s.K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const scalar_t* g = grad_out + plane * s.PH * s.PW;
      const uint8_t* am = argmax + plane * s.PH * s.PW;
      scalar_t* dst = grad_conv + plane * s.P * s.Q;
      std::fill(dst, dst + s.P * s.Q, scalar_t(0));
      scalar_t sum = 0;
      for (int64_t ph = 0; ph < s.PH; ++ph) {
        for (int64_t pw = 0; pw < s.PW; ++pw) {
          const int64_t off = offset[am[ph * s.PW + pw]];
          if (off < 0) continue;
          const scalar_t v = g[ph * s.PW + pw];
          dst[ph * s.pool_sh * s.Q + pw * s.pool_sw + off] += v;
          sum += v;
        }
      }
      if (plane_sums != nullptr) plane_sums[plane] = sum;
    }
  });
}

// grad_bias[k] += sum over n of plane_sums[n][k], in batch order (deterministic).
template <typename T>
void add_plane_sums_in_batch_order(const ConvPoolShape& s, const std::vector<T>& plane_sums, T* grad_bias) {
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t k = 0; k < s.K; ++k) grad_bias[k] += plane_sums[n * s.K + k];
  }
}

// The ATen path's backward. The routed conv-output gradient has at most one nonzero per pool
// window (a quarter of it for a 2x2 pool, less where ReLU zeroed the window), yet a dense
// convolution_backward multiplies all of it. The scatter backward works from the live pooled
// elements only: grad_weight row k sums gradient * input patch over plane k's live elements, and
// grad_input adds gradient * filter k into the patch each one read. Vectorised over input
// channels (transposed to channels-last, padded to whole vectors), so it needs enough of them to
// fill a 64-byte vector. Measured on the 2-core AVX-512 EPYC, float32, batch 8, 2x2 pool, whole
// backward, dense vs scatter: 64->64 56x56 k3 (the VGG block) 20-32 vs 15-17 ms; 32->64 56x56 k3
// 11-15 vs 8 ms; 128->128 28x28 k3 17.5 vs 10.8 ms; 256->256 14x14 k3 18 vs 11.7 ms; 16->32 56x56
// k5 7-9 vs 6-7 ms; 8->32 56x56 k7 9.4-10.7 vs 10.7-11 ms; 3->64 224x224 k11 stride 4 36-38 vs
// 42-56 ms. LIGHTNET_OPS_CPU_ATEN_BACKWARD=scatter|dense overrides the choice (tests cover both).
bool use_scatter_backward(const ConvPoolShape& s, int64_t elem_size) {
  if (const int forced = cpu::env_choice("LIGHTNET_OPS_CPU_ATEN_BACKWARD", "scatter", "dense"); forced >= 0) {
    return forced == 1;
  }
  return s.C * elem_size >= 64;
}

// Direct path: grad_weight from the span kernel instead of the direct kernel. The direct kernel
// multiplies every window offset's masked gradient plane (pool window area x the live elements);
// the span kernel multiplies only live elements, but in whole vectors over each span of Ls
// elements, Lp lanes with padding. Worth it when window area * Ls is at least 2 * Lp (C >= 3 for
// a 3x3 filter and a 2x2 pool). Measured on the 2-core AVX-512 EPYC, float32, batch 64, 15x15,
// 3x3, K = 16, grad_weight only, direct vs span: C = 1 61 vs 89 us, 2 94 vs 92, 3 127 vs 97,
// 4 187 vs 110, 6 (LightNet conv2) 255 vs 149, 16 646 vs 254, 28 1095 vs 433; C = 6 with a 5x5
// filter 528 vs 150, with a 3x3 pool 304 vs 103; C = 3, K = 32, 32x32: 698 vs 761; batch 8,
// 16 -> 32 channels, 56x56: 1370 vs 784. LIGHTNET_OPS_CPU_DIRECT_WEIGHT_GRAD=span|direct
// overrides the choice (tests cover both).
bool use_span_grad_weight(const ConvPoolShape& s, int64_t elem_size);

// Direct path: forward by the Winograd variant of the direct kernel (3x3 filter, stride 1,
// dilation 1, 2x2 pool with stride 2). Per tile and output channel: 16 multiply-adds per input
// channel instead of 36, plus the transforms (the output one per output channel), which only pay
// off with a few input channels. Measured on the 2-core AVX-512 EPYC, float32, batch 64, 15x15,
// K = 16, direct vs Winograd: C = 2 72 vs 73 us, 3 89-96 vs 88-92, 6 (LightNet conv2) 150-159 vs
// 128-136, 16 361-374 vs 274-289 (and for LightNet conv1, C = 1, 32x32, K = 6: 85 vs 81, left
// direct: the gain is within noise there). LIGHTNET_OPS_CPU_DIRECT_FORWARD=winograd|direct
// overrides the choice (tests cover both); shapes it cannot take always get the direct kernel.
// The same transforms, adjoint, give the direct backward's grad_input (16 multiply-adds per tile
// and channel pair instead of 36, plus the transforms), from 4 input channels on. Measured
// likewise, grad_input only, direct vs Winograd: C = 2 75 vs 80 us, 3 100 vs 110, 4 122 vs 116,
// 5 149 vs 146, 6 (LightNet conv2) 175 vs 156 (whole backward 311 vs 297), 16 411 vs 343.
// LIGHTNET_OPS_CPU_DIRECT_INPUT_GRAD=winograd|direct overrides that choice.
bool use_direct_winograd(const ConvPoolShape& s, const char* override_variable, int64_t min_channels) {
  const bool fits = s.R == 3 && s.S == 3 && s.stride_h == 1 && s.stride_w == 1 && s.dil_h == 1 && s.dil_w == 1 &&
                    s.pool_kh == 2 && s.pool_kw == 2 && s.pool_sh == 2 && s.pool_sw == 2;
  if (!fits) return false;
  if (const int forced = cpu::env_choice(override_variable, "winograd", "direct"); forced >= 0) return forced == 1;
  return s.C >= min_channels;
}

// Channels padded to a multiple of 64 bytes (the widest vector) for the Winograd forward.
int64_t padded_channels(int64_t C, int64_t elem_size) {
  const int64_t lanes = 64 / elem_size;
  return (C + lanes - 1) / lanes * lanes;
}

// (N, C, H, W) -> (N, H + 2 * pad_h, W + 2 * pad_w, Cp), or (K, C, R, S) -> (K, R, S, Cp) with no
// spatial padding: zeros in the padded channels and around the image.
at::Tensor channels_last_padded(const at::Tensor& t, int64_t Cp, int64_t pad_h = 0, int64_t pad_w = 0) {
  const int64_t C = t.size(1), H = t.size(2), W = t.size(3);
  if (Cp == C && pad_h == 0 && pad_w == 0) return t.permute({0, 2, 3, 1}).contiguous();
  auto out = at::zeros({t.size(0), H + 2 * pad_h, W + 2 * pad_w, Cp}, t.options());
  out.narrow(1, pad_h, H).narrow(2, pad_w, W).narrow(3, 0, C).copy_(t.permute({0, 2, 3, 1}));
  return out;
}

// The scatter backward's span geometry (see ScatterArgs): span length, and its stride rounded up
// to 64 bytes so that every instruction set's vectors fit in it.
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

bool use_span_grad_weight(const ConvPoolShape& s, int64_t elem_size) {
  if (const int forced = cpu::env_choice("LIGHTNET_OPS_CPU_DIRECT_WEIGHT_GRAD", "span", "direct"); forced >= 0) {
    return forced == 1;
  }
  const SpanGeometry g(s, elem_size);
  return s.pool_kh * s.pool_kw * g.Ls >= 2 * g.Lp;
}

template <typename T>
void scatter_backward(const ConvPoolShape& s, const at::Tensor& grad_out, const at::Tensor& input,
                      const at::Tensor& weight, const at::Tensor& argmax, std::array<bool, 3> mask,
                      at::Tensor& grad_input, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const SpanGeometry g(s, sizeof(T));
  const int64_t slack = 64 / int64_t(sizeof(T));  // room for the last vector of a span to run over
  const int64_t sample = g.Hp * g.Wp * s.C;
  at::Tensor x_t;
  if (mask[1]) {
    x_t = at::empty({s.N * sample + slack}, input.options());
    const at::Tensor image = x_t.narrow(0, 0, s.N * sample).view({s.N, g.Hp, g.Wp, s.C});
    if (s.pad_h > 0 || s.pad_w > 0) image.zero_();
    x_t.narrow(0, s.N * sample, slack).zero_();
    image.narrow(1, s.pad_h, s.H).narrow(2, s.pad_w, s.W).copy_(input.permute({0, 2, 3, 1}));
  }
  at::Tensor w_t;
  if (mask[0]) {
    w_t = at::zeros({s.K, s.R, g.Lp}, input.options());
    g.taps(w_t, s).copy_(weight.permute({0, 2, 3, 1}));
  }
  const int64_t gi_stride = sample + slack;
  at::Tensor gi_t = mask[0] ? at::empty({s.N, gi_stride}, input.options()) : at::Tensor();
  // The kernel writes every grad_weight element once it has a sample; an empty batch gets zeros.
  at::Tensor gw_t = mask[1] ? (s.N > 0 ? at::empty({s.K, s.R, g.Lp}, input.options())
                                       : at::zeros({s.K, s.R, g.Lp}, input.options()))
                            : at::Tensor();
  const cpu::ArgmaxOffsets offsets(s);
  const ScatterArgs<T> a{&s,
                         g.Ls,
                         g.Lp,
                         g.Wp * s.C,
                         mask[1] ? x_t.const_data_ptr<T>() : nullptr,
                         mask[0] ? w_t.const_data_ptr<T>() : nullptr,
                         grad_out.const_data_ptr<T>(),
                         argmax.const_data_ptr<uint8_t>(),
                         mask[0] ? gi_t.mutable_data_ptr<T>() : nullptr,
                         gi_stride,
                         mask[1] ? gw_t.mutable_data_ptr<T>() : nullptr,
                         &offsets};
  const Kernels<T> kern = kernels<T>(cpu::cpu_isa(), 4);
  // Rows of grad_weight (one thread each, fixed order) and samples of grad_input: the result does
  // not depend on the number of threads.
  if (mask[1]) at::parallel_for(0, s.K, 1, [&](int64_t k0, int64_t k1) { kern.scatter_grad_weight(a, k0, k1); });
  if (mask[0]) at::parallel_for(0, s.N, 1, [&](int64_t n0, int64_t n1) { kern.scatter_grad_input(a, n0, n1); });
  if (mask[0]) {
    grad_input = gi_t.narrow(1, 0, sample)
                     .view({s.N, g.Hp, g.Wp, s.C})
                     .narrow(1, s.pad_h, s.H)
                     .narrow(2, s.pad_w, s.W)
                     .permute({0, 3, 1, 2})
                     .contiguous();
  }
  if (mask[1]) grad_weight = g.taps(gw_t, s).permute({0, 3, 1, 2}).contiguous();
  if (mask[2]) {
    // Per plane in position order, then over the batch in order (the dense path's order).
    std::vector<T> plane_sums(s.N * s.K);
    const int64_t F = s.PH * s.PW;
    at::parallel_for(0, s.N * s.K, 16, [&](int64_t p0, int64_t p1) {
      for (int64_t plane = p0; plane < p1; ++plane) {
        const T* g = grad_out.const_data_ptr<T>() + plane * F;
        const uint8_t* am = argmax.const_data_ptr<uint8_t>() + plane * F;
        T sum = 0;
        for (int64_t f = 0; f < F; ++f) {
          if (offsets.dy[am[f]] >= 0) sum += g[f];  // live elements only
        }
        plane_sums[plane] = sum;
      }
    });
    add_plane_sums_in_batch_order(s, plane_sums, grad_bias.mutable_data_ptr<T>());
  }
}

// Winograd F(2x2, 3x3) forward of the ATen path. With a 3x3 filter, stride 1 and dilation 1,
// each 2x2 / stride-2 pool window is exactly one Winograd output tile: per tile and channel pair,
// 16 multiplications in the transformed domain instead of 36, as 16 GEMMs (tiles x C) @ (C x K)
// per sample, and the output transform hands the window's four conv values straight to the
// bias / max-pool / ReLU / argmax epilogue (no conv output tensor). Measured on the 2-core
// AVX-512 EPYC, VGG block (B8, 64->64, 56x56, float32): oneDNN's convolution alone 8.5-9.2 ms,
// this whole forward (with argmax) 6.0-6.1 ms, stock 12.5 ms; max error against float64 2.2e-6
// (stock's 1.8e-6). Vectorised over input / output channels, so used with at least 64 bytes of
// them; the transforms add and subtract, so rounding differs slightly from a direct convolution
// (covered by the parity tests' tolerances against a float64 reference).
// LIGHTNET_OPS_CPU_ATEN_FORWARD=winograd|conv overrides the choice where the geometry allows it.
bool use_winograd(const ConvPoolShape& s, int64_t elem_size) {
  const bool geometry = s.R == 3 && s.S == 3 && s.stride_h == 1 && s.stride_w == 1 && s.dil_h == 1 &&
                        s.dil_w == 1 && s.pool_kh == 2 && s.pool_kw == 2 && s.pool_sh == 2 && s.pool_sw == 2;
  if (!geometry) return false;
  if (const int forced = cpu::env_choice("LIGHTNET_OPS_CPU_ATEN_FORWARD", "winograd", "conv"); forced >= 0) {
    return forced == 1;
  }
  return s.C * elem_size >= 64 && s.K * elem_size >= 64;
}

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
  const bool finite = winograd_weights<T>(
      s, weight.const_data_ptr<T>(), [&](int64_t xi, int64_t c, int64_t k) -> T& { return u[(k * s.C + c) * 16 + xi]; });
  return finite ? u : std::vector<T>();
}

// Returns false when the weights, the input or a conv value is not finite (the transforms would
// place NaNs and infinities differently from a direct convolution, and their intermediates can
// overflow before a direct sum would); out / argmax may then be partly written, and the caller
// recomputes all of them with ATen's convolution.
template <typename T>
bool winograd_forward(const ConvPoolShape& s, const at::Tensor& input, const at::Tensor& weight,
                      const at::Tensor& bias, at::Tensor& out, at::Tensor& argmax, bool need_argmax) {
  const int64_t Cp = padded_channels(s.C, sizeof(T)), Kp = padded_channels(s.K, sizeof(T));
  // U[xi][c][k] = (G g G^T)[xi] for the 3x3 filter g of (k, c); zeros for padded channels.
  at::Tensor U = at::zeros({16, Cp, Kp}, input.options());
  {
    const auto w = weight.contiguous();
    T* u = U.mutable_data_ptr<T>();
    if (!winograd_weights<T>(s, w.const_data_ptr<T>(),
                             [&](int64_t xi, int64_t c, int64_t k) -> T& { return u[(xi * Cp + c) * Kp + k]; })) {
      return false;
    }
  }
  const at::Tensor x_t = channels_last_padded(input, Cp, s.pad_h, s.pad_w);
  const cpu::WinogradArgs<T> a{&s,
                               Cp,
                               Kp,
                               x_t.const_data_ptr<T>(),
                               bias.defined() ? bias.const_data_ptr<T>() : nullptr,
                               out.mutable_data_ptr<T>(),
                               need_argmax ? argmax.mutable_data_ptr<uint8_t>() : nullptr};
  const Kernels<T> kern = kernels<T>(cpu::cpu_isa(), 4);
  // Work items are blocks of pooled rows of one sample, about 256 tiles each: the block's
  // transformed tiles V and products M (16 x tiles x channels each; 0.8 MB for the VGG block's 64
  // channels) stay in this core's L2. Each item runs on one thread with a single-threaded GEMM
  // (nested inside the parallel region), so the result does not depend on the thread count.
  const int64_t max_rows = std::max<int64_t>(1, std::min<int64_t>(s.PH, 256 / std::max<int64_t>(1, s.PW)));
  const int64_t blocks = (s.PH + max_rows - 1) / max_rows;
  const int64_t rows = (s.PH + blocks - 1) / blocks;  // balanced: VGG's 28 pooled rows are 4 x 7
  std::atomic<bool> ok{true};
  at::parallel_for(0, s.N * blocks, 1, [&](int64_t i0, int64_t i1) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads: no autograd
    at::Tensor V = at::empty({16, rows * s.PW, Cp}, input.options());
    at::Tensor M = at::empty({16, rows * s.PW, Kp}, input.options());
    for (int64_t item = i0; item < i1 && ok; ++item) {
      const int64_t n = item / blocks, ph0 = (item % blocks) * rows, ph1 = std::min(s.PH, ph0 + rows);
      const bool full = ph1 - ph0 == rows;
      at::Tensor v = full ? V : at::empty({16, (ph1 - ph0) * s.PW, Cp}, input.options());
      at::Tensor m = full ? M : at::empty({16, (ph1 - ph0) * s.PW, Kp}, input.options());
      if (!kern.winograd_input(a, n, ph0, ph1, v.mutable_data_ptr<T>())) {
        ok = false;
        break;
      }
      at::bmm_out(m, v, U);
      if (!kern.winograd_output(a, n, ph0, ph1, m.const_data_ptr<T>())) ok = false;
    }
  });
  return ok;
}

// ------------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------------

// Whether every element of t is finite (the instruction set's vectorised scan, split across
// threads above 64K elements).
bool tensor_is_finite(const at::Tensor& t) {
  std::atomic<bool> finite{true};
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "conv2d_relu_maxpool2d_all_finite", [&] {
    const auto c = t.contiguous();
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    const FiniteFn<scalar_t> fn = kernels<scalar_t>(cpu::cpu_isa(), 4).finite;
    at::parallel_for(0, c.numel(), 1 << 16, [&](int64_t b, int64_t e) {
      if (!fn(p + b, e - b)) finite = false;
    });
  });
  return finite;
}

template <typename T>
void direct_forward_launch(const ConvPoolShape& s, const at::Tensor& input, const at::Tensor& weight,
                           const at::Tensor& bias, at::Tensor& out, at::Tensor& argmax, bool need_argmax) {
  const Isa isa = cpu::cpu_isa();
  const Direct d = cpu::make_direct(s, channel_block(isa));
  std::vector<T> wpk(d.Kpad * d.CRS), bpk(d.Kpad);
  pack_weight<T>(d, weight.const_data_ptr<T>(), bias.defined() ? bias.const_data_ptr<T>() : nullptr, wpk.data(),
                 bpk.data());
  DirectFwdArgs<T> a{&d, input.const_data_ptr<T>(), wpk.data(), bpk.data(), out.mutable_data_ptr<T>(),
                     need_argmax ? argmax.mutable_data_ptr<uint8_t>() : nullptr};
  const Kernels<T> kern = kernels<T>(isa, d.KB);
  FwdFn<T> fn = kern.fwd;
  // The weights are finite (checked by the caller); their transform could still overflow.
  const std::vector<T> wino_u = use_direct_winograd(s, "LIGHTNET_OPS_CPU_DIRECT_FORWARD", 3)
                                    ? direct_winograd_weights<T>(s, weight)
                                    : std::vector<T>();
  if (!wino_u.empty()) {
    a.wino_u = wino_u.data();
    a.bias = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
    fn = kern.fwd_winograd;
  }
  at::parallel_for(0, s.N, 1, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_maxpool2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                                                             const c10::optional<at::Tensor>& bias,
                                                             at::IntArrayRef stride, at::IntArrayRef padding,
                                                             at::IntArrayRef dilation, at::IntArrayRef pool_kernel_size,
                                                             at::IntArrayRef pool_stride, bool need_argmax) {
  const ConvPoolShape s =
      conv_pool_shape(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride);
  check_cpu_dtype(input, "conv2d_relu_maxpool2d");
  auto out = at::empty({s.N, s.K, s.PH, s.PW}, input.options());
  auto argmax = need_argmax ? at::empty({s.N, s.K, s.PH, s.PW}, input.options().dtype(at::kByte))
                            : at::empty({0}, input.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, argmax};
  const at::Tensor b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  // The direct kernel multiplies the conv padding's zeros by the weights; ATen's convolution
  // skips those taps, so an infinite weight gives NaN only in the direct path. Non-finite weights
  // (a cheap scan: K * C * R * S elements) take the ATen path, whose output is stock's.
  if (use_direct(s, input.element_size()) && tensor_is_finite(weight)) {
    const auto x = input.contiguous();
    const auto w = weight.contiguous();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_cpu_direct", [&] {
      direct_forward_launch<scalar_t>(s, x, w, b, out, argmax, need_argmax);
    });
    return {out, argmax};
  }
  if (use_winograd(s, input.element_size())) {
    bool done = false;
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_cpu_winograd", [&] {
      done = winograd_forward<scalar_t>(s, input, weight, b, out, argmax, need_argmax);
    });
    if (done) return {out, argmax};
  }
  // The batch goes through in chunks (aten_forward_chunk): each chunk's conv output is pooled
  // while it is still in cache, and only one chunk's conv output is alive at a time.
  const int64_t per_chunk = aten_forward_chunk(s, input.element_size());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_cpu", [&] {
    const PoolFn<scalar_t> fn = kernels<scalar_t>(cpu::cpu_isa(), 4).pool;
    for (int64_t n0 = 0; n0 < s.N; n0 += per_chunk) {
      ConvPoolShape cs = s;
      cs.N = std::min(per_chunk, s.N - n0);
      const auto conv = at::convolution(input.narrow(0, n0, cs.N), weight, c10::nullopt, stride, padding, dilation,
                                        false, {0, 0}, 1)
                            .contiguous();
      const int64_t first = n0 * s.K * s.PH * s.PW;  // first pooled element of the chunk
      const PoolArgs<scalar_t> a{&cs, conv.const_data_ptr<scalar_t>(),
                                 b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                                 out.mutable_data_ptr<scalar_t>() + first,
                                 need_argmax ? argmax.mutable_data_ptr<uint8_t>() + first : nullptr};
      at::parallel_for(0, cs.N * s.K, 1, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
    }
  });
  return {out, argmax};
}

// grad_weight of the direct path through the span kernel (use_span_grad_weight): per sample,
// every live pooled element adds gradient * the spans of the conv position it selected (one
// vector per span slice instead of the direct kernel's sweep over every window offset). Runs per
// chunk of direct_backward_launch's fixed split of the batch, inside its parallel region (the
// chunk's samples are still in cache from the direct kernel); partial sums per chunk, reduced in
// chunk order: independent of the thread count.
template <typename T>
class SpanGradWeight {
 public:
  SpanGradWeight(const ConvPoolShape& s, const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& argmax,
                 int64_t chunks)
      : s_(s), geo_(s, sizeof(T)), pos_base_(s.PH * s.PW) {
    // The span-row offset of the conv position that pooled position f selects with window offset
    // w is linear in both: pos_base[f] (the window's first position) + byte_off[w].
    const int64_t Xn = geo_.Wp - geo_.Sd + 1;
    const cpu::ArgmaxOffsets offsets(s);
    for (int64_t ph = 0; ph < s.PH; ++ph)
      for (int64_t pw = 0; pw < s.PW; ++pw)
        pos_base_[ph * s.PW + pw] = (ph * s.pool_sh * s.stride_h * Xn + pw * s.pool_sw * s.stride_w) * geo_.Lp;
    for (int b = 0; b < 256; ++b) {
      byte_live_[b] = offsets.dy[b] >= 0;
      byte_off_[b] = byte_live_[b] ? (offsets.dy[b] * s.stride_h * Xn + offsets.dx[b] * s.stride_w) * geo_.Lp : 0;
    }
    args_ = cpu::SpanGradWeightArgs<T>{&s_,
                                       geo_.Ls,
                                       geo_.Lp,
                                       Xn,
                                       input.const_data_ptr<T>(),
                                       grad_out.const_data_ptr<T>(),
                                       argmax.const_data_ptr<uint8_t>(),
                                       pos_base_.data(),
                                       byte_off_,
                                       byte_live_};
    fn_ = kernels<T>(cpu::cpu_isa(), 4).span_grad_weight;
    part_ = s.K * s.R * geo_.Lp;
    partial_ = at::zeros({chunks, part_}, input.options());
  }
  SpanGradWeight(const SpanGradWeight&) = delete;  // args_ points into the members
  SpanGradWeight& operator=(const SpanGradWeight&) = delete;

  void run_chunk(int64_t ch, int64_t n0, int64_t n1) {
    if (n0 < n1) fn_(args_, n0, n1, partial_.mutable_data_ptr<T>() + ch * part_);
  }

  // Chunk 0 accumulates the others, in chunk order; then the taps' columns of the spans: weight
  // (k, c, r, q) is span (k, r) at column q * dil_w, channel c (a plain loop: the equivalent
  // view / slice / permute / copy_ chain cost more in ATen dispatch than the copy itself).
  void finish(at::Tensor& grad_weight) {
    T* sums = partial_.mutable_data_ptr<T>();
    for (int64_t ch = 1; ch < partial_.size(0); ++ch) {
      const T* src = sums + ch * part_;
      for (int64_t i = 0; i < part_; ++i) sums[i] += src[i];
    }
    TORCH_INTERNAL_ASSERT(grad_weight.is_contiguous());
    T* gw = grad_weight.mutable_data_ptr<T>();
    for (int64_t k = 0; k < s_.K; ++k)
      for (int64_t c = 0; c < s_.C; ++c)
        for (int64_t r = 0; r < s_.R; ++r)
          for (int64_t q = 0; q < s_.S; ++q)
            *gw++ = sums[(k * s_.R + r) * geo_.Lp + q * s_.dil_w * s_.C + c];
  }

 private:
  const ConvPoolShape s_;
  const SpanGeometry geo_;
  std::vector<int64_t> pos_base_;
  int64_t byte_off_[256], byte_live_[256];
  cpu::SpanGradWeightArgs<T> args_{};
  SpanGwFn<T> fn_ = nullptr;
  int64_t part_ = 0;
  at::Tensor partial_;
};

template <typename T>
void direct_backward_launch(const ConvPoolShape& s, const at::Tensor& grad_out, const at::Tensor& input,
                            const at::Tensor& weight, const at::Tensor& argmax, std::array<bool, 3> mask,
                            bool span_weight, at::Tensor& grad_input, at::Tensor& grad_weight,
                            at::Tensor& grad_bias) {
  const Isa isa = cpu::cpu_isa();
  const Direct d = cpu::make_direct(s, backward_channel_block(isa, s.K));
  std::vector<T> wpk(d.Kpad * d.CRS);
  pack_weight<T>(d, weight.const_data_ptr<T>(), nullptr, wpk.data(), nullptr);
  // Empty (the direct grad_input) unless the Winograd one is chosen and its weights are finite.
  const std::vector<T> wino_u = mask[0] && use_direct_winograd(s, "LIGHTNET_OPS_CPU_DIRECT_INPUT_GRAD", 4)
                                    ? direct_winograd_weights<T>(s, weight)
                                    : std::vector<T>();
  // A fixed split of the batch into chunks (a function of the shapes only): the partial weight /
  // bias gradients, kept per lane and reduced in lane then chunk order, do not depend on the number
  // of threads. Up to 16 chunks (enough to balance a few cores), fewer when the partials get large.
  if (span_weight) mask[1] = false;  // grad_weight from SpanGradWeight, the rest from the direct kernel
  const bool need_w = mask[1], need_b = mask[2], need_direct = mask[0] || mask[1] || mask[2];
  const int64_t part = ((need_w ? d.Kpad * d.CRS : 0) + (need_b ? d.Kpad : 0)) * cpu::kPartialLanes;
  const int64_t budget = std::max<int64_t>(1, (int64_t(64) << 20) / std::max<int64_t>(1, part * int64_t(sizeof(T))));
  const int64_t chunks = std::max<int64_t>(1, std::min({s.N, int64_t(16), budget}));
  const int64_t per_chunk = (s.N + chunks - 1) / chunks;
  const int64_t gw_stride = d.Kpad * d.CRS * cpu::kPartialLanes, gb_stride = d.Kpad * cpu::kPartialLanes;
  const int64_t gw_entries = s.K * d.CRS, gb_entries = s.K;
  // Per-lane partials (uninitialised; each chunk zeroes its own slice, in parallel and while it
  // is about to be used) and their per-chunk lane sums. The partials come from PyTorch's allocator
  // so that memory profiling sees them (about 1 MiB for LightNet's conv2 at batch 64).
  const at::Tensor gw_part = at::empty({need_w ? chunks * gw_stride : 0}, input.options());
  const at::Tensor gb_part = at::empty({need_b ? chunks * gb_stride : 0}, input.options());
  std::vector<T> gw_chunk(need_w ? chunks * gw_entries : 0), gb_chunk(need_b ? chunks * gb_entries : 0);
  std::optional<SpanGradWeight<T>> span;
  if (span_weight) span.emplace(s, grad_out, input, argmax, chunks);
  const DirectBwdArgs<T> a{&d,
                           input.const_data_ptr<T>(),
                           wpk.data(),
                           grad_out.const_data_ptr<T>(),
                           argmax.const_data_ptr<uint8_t>(),
                           mask[0] ? grad_input.mutable_data_ptr<T>() : nullptr,
                           need_w,
                           need_b,
                           wino_u.empty() ? nullptr : wino_u.data()};
  const BwdFn<T> fn = kernels<T>(isa, d.KB).bwd;
  // Lane sums in lane order, per chunk (inside the parallel region: the slice is still in cache).
  const auto sum_lanes = [](const T* part_sums, int64_t entries, T* dst) {
    for (int64_t i = 0; i < entries; ++i) {
      const T* lanes = part_sums + i * cpu::kPartialLanes;
      T sum = lanes[0];
      for (int64_t l = 1; l < cpu::kPartialLanes; ++l) sum += lanes[l];
      dst[i] = sum;
    }
  };
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t n0 = ch * per_chunk, n1 = std::min(s.N, n0 + per_chunk);
      T* gw = need_w ? gw_part.mutable_data_ptr<T>() + ch * gw_stride : nullptr;
      T* gb = need_b ? gb_part.mutable_data_ptr<T>() + ch * gb_stride : nullptr;
      if (gw) std::fill(gw, gw + gw_stride, T(0));
      if (gb) std::fill(gb, gb + gb_stride, T(0));
      if (n0 < n1 && need_direct) fn(a, n0, n1, gw, gb);
      if (gw) sum_lanes(gw, gw_entries, gw_chunk.data() + ch * gw_entries);
      if (gb) sum_lanes(gb, gb_entries, gb_chunk.data() + ch * gb_entries);
      if (span) span->run_chunk(ch, n0, n1);
    }
  });
  if (span) span->finish(grad_weight);
  // Chunk order: the result does not depend on the number of threads.
  const auto reduce = [&](const std::vector<T>& chunk_sums, int64_t entries, T* dst) {
    for (int64_t ch = 0; ch < chunks; ++ch) {
      for (int64_t i = 0; i < entries; ++i) dst[i] += chunk_sums[ch * entries + i];
    }
  };
  if (need_w) reduce(gw_chunk, gw_entries, grad_weight.mutable_data_ptr<T>());
  if (need_b) reduce(gb_chunk, gb_entries, grad_bias.mutable_data_ptr<T>());
}

// The direct and scatter backwards multiply only the input / weight elements that a selected
// conv position reads; stock's dense convolution_backward also multiplies the rest by a zero
// gradient, which turns an infinite or NaN input (weight) element into NaN across grad_weight
// (grad_input). To give the same NaNs, non-finite operands take the dense ATen backward (one
// vectorised scan decides).
bool sparse_backward_matches_stock(const at::Tensor& input, const at::Tensor& weight, std::array<bool, 3> mask) {
  return (!mask[0] || tensor_is_finite(weight)) && (!mask[1] || tensor_is_finite(input));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_maxpool2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& argmax,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, at::IntArrayRef pool_kernel_size,
    at::IntArrayRef pool_stride, std::array<bool, 3> output_mask) {
  const ConvPoolShape s =
      conv_pool_shape(input, weight, c10::nullopt, stride, padding, dilation, pool_kernel_size, pool_stride);
  check_cpu_dtype(input, "conv2d_relu_maxpool2d_backward");
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({s.N, s.K, s.PH, s.PW}),
              "conv2d_relu_maxpool2d_backward: grad_output has shape ", grad_output.sizes(), ", expected [", s.N, ", ",
              s.K, ", ", s.PH, ", ", s.PW, "]");
  TORCH_CHECK(argmax.scalar_type() == at::kByte && argmax.sizes() == grad_output.sizes(),
              "conv2d_relu_maxpool2d_backward: argmax must be uint8 of shape ", grad_output.sizes(), ", got ",
              argmax.scalar_type(), " ", argmax.sizes(), " (was the forward run with need_argmax=true?)");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "conv2d_relu_maxpool2d_backward: grad_output dtype ",
              grad_output.scalar_type(), " does not match input dtype ", input.scalar_type());
  // Each masked-off output is its own empty tensor: outputs must not alias.
  const auto empty = [&] { return at::empty({0}, input.options()); };
  // The direct path, else the scatter backward, when their operands are finite; else dense.
  const bool direct = use_direct(s, input.element_size());
  // The scatter grad_input also adds its spans' zero lanes into neighbouring positions, which a
  // non-finite gradient would turn into NaN there: a non-finite grad_output takes the dense path.
  const bool sparse =
      (direct || (use_scatter_backward(s, input.element_size()) &&
                  (!output_mask[0] || tensor_is_finite(grad_output.contiguous())))) &&
      sparse_backward_matches_stock(input, weight, output_mask);
  if (direct && sparse) {
    // grad_weight / grad_bias are accumulated into, so they start at zero (this also covers an
    // empty batch); the kernel zeroes each sample's grad_input before writing it.
    at::Tensor grad_input = output_mask[0] ? at::empty({s.N, s.C, s.H, s.W}, input.options()) : empty();
    at::Tensor grad_weight = output_mask[1] ? at::zeros({s.K, s.C, s.R, s.S}, input.options()) : empty();
    at::Tensor grad_bias = output_mask[2] ? at::zeros({s.K}, input.options()) : empty();
    if (s.N > 0 && (output_mask[0] || output_mask[1] || output_mask[2])) {
      const auto g = grad_output.contiguous();
      const auto am = argmax.contiguous();
      const auto x = input.contiguous();
      const auto w = weight.contiguous();
      // grad_weight from the span kernel when it is the faster one, the rest from the direct kernel.
      const bool span_weight = output_mask[1] && use_span_grad_weight(s, input.element_size());
      AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_backward_cpu_direct", [&] {
        direct_backward_launch<scalar_t>(s, g, x, w, am, output_mask, span_weight, grad_input, grad_weight, grad_bias);
      });
    }
    return {grad_input, grad_weight, grad_bias};
  }
  if (!direct && sparse) {
    at::Tensor grad_input = empty(), grad_weight = empty();
    at::Tensor grad_bias = output_mask[2] ? at::zeros({s.K}, input.options()) : empty();
    const auto g = grad_output.contiguous();
    const auto am = argmax.contiguous();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_backward_cpu_scatter", [&] {
      scatter_backward<scalar_t>(s, g, input, weight, am, output_mask, grad_input, grad_weight, grad_bias);
    });
    return {grad_input, grad_weight, grad_bias};
  }
  auto grad_conv = at::empty({s.N, s.K, s.P, s.Q}, input.options());
  at::Tensor grad_input = empty(), grad_weight = empty(), grad_bias = empty();
  if (output_mask[2]) grad_bias = at::zeros({s.K}, input.options());
  if (grad_conv.numel() > 0) {
    const auto g = grad_output.contiguous();
    const auto am = argmax.contiguous();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_backward_cpu", [&] {
      std::vector<scalar_t> plane_sums(output_mask[2] ? s.N * s.K : 0);
      route_grad<scalar_t>(s, g.const_data_ptr<scalar_t>(), am.const_data_ptr<uint8_t>(),
                           grad_conv.mutable_data_ptr<scalar_t>(), output_mask[2] ? plane_sums.data() : nullptr);
      if (output_mask[2]) add_plane_sums_in_batch_order(s, plane_sums, grad_bias.mutable_data_ptr<scalar_t>());
    });
  }
  if (output_mask[0] || output_mask[1]) {
    auto grads = at::convolution_backward(grad_conv, input, weight, c10::nullopt, stride, padding, dilation, false,
                                          {0, 0}, 1, {output_mask[0], output_mask[1], false});
    if (output_mask[0]) grad_input = std::get<0>(grads);
    if (output_mask[1]) grad_weight = std::get<1>(grads);
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(lightnet_ops, CPU, m) {
  m.impl("conv2d_relu_maxpool2d", &composite::conv_forward_op<&conv2d_relu_maxpool2d_cpu>);
  m.impl("conv2d_relu_maxpool2d_backward", &composite::conv_backward_op<&conv2d_relu_maxpool2d_backward_cpu>);
}

}  // namespace lightnet_ops

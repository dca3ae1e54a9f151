// ATen-path Winograd F(2x2, 3x3) forward of the CPU conv2d_relu_maxpool2d (plan: aten-winograd):
// each 2x2 / stride-2 pool window is exactly one output tile, so per tile and channel pair 16
// multiplications replace 36, as 16 GEMMs (tiles x C) @ (C x K) per block of tiles, and the output
// transform hands the window's four conv values straight to the bias / max-pool / ReLU / argmax
// epilogue (no conv output tensor). The transforms add and subtract, so rounding differs slightly
// from a direct convolution (within the parity tests' float64-referenced tolerances).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "lightnet_ops/cpu_conv_args.h"
#include "lightnet_ops/cpu_conv_paths.h"
#include "lightnet_ops/cpu_simd.h"

#if LIGHTNET_OPS_X86_DISPATCH
#include <immintrin.h>  // intrinsics used only inside the AVX2 / AVX-512 target regions
#endif

#define LIGHTNET_OPS_KERNELS_HEADER "lightnet_ops/cpu_conv_winograd_kernels.h"
#include "lightnet_ops/cpu_isa_variants.h"

namespace lightnet_ops {
namespace cpu {
namespace {

template <typename T>
struct WinogradKernels {
  bool (*input)(const WinogradArgs<T>&, int64_t, int64_t, int64_t, T*);         // per block of pooled rows
  bool (*output)(const WinogradArgs<T>&, int64_t, int64_t, int64_t, const T*);  // likewise
};

template <typename T>
WinogradKernels<T> winograd_kernels(Isa isa) {
#if LIGHTNET_OPS_X86_DISPATCH
  if (isa == Isa::kAvx512) return {&isa_avx512::winograd_input_transform<T>, &isa_avx512::winograd_output_pool<T>};
  if (isa == Isa::kAvx2) return {&isa_avx2::winograd_input_transform<T>, &isa_avx2::winograd_output_pool<T>};
#endif
  (void)isa;
  return {&isa_default::winograd_input_transform<T>, &isa_default::winograd_output_pool<T>};
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

template <typename T>
bool winograd_forward(const ConvPoolShape& s, Isa isa, const at::Tensor& input, const at::Tensor& weight,
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
  const WinogradArgs<T> a{&s,
                          Cp,
                          Kp,
                          x_t.const_data_ptr<T>(),
                          bias.defined() ? bias.const_data_ptr<T>() : nullptr,
                          out.mutable_data_ptr<T>(),
                          need_argmax ? argmax.mutable_data_ptr<uint8_t>() : nullptr};
  const WinogradKernels<T> kern = winograd_kernels<T>(isa);
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
      if (!kern.input(a, n, ph0, ph1, v.mutable_data_ptr<T>())) {
        ok = false;
        break;
      }
      at::bmm_out(m, v, U);
      if (!kern.output(a, n, ph0, ph1, m.const_data_ptr<T>())) ok = false;
    }
  });
  return ok;
}

}  // namespace

bool run_aten_winograd_forward(const ConvPoolShape& s, const ConvForwardPlan& plan, const at::Tensor& input,
                               const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out, at::Tensor& argmax,
                               bool need_argmax) {
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_maxpool2d_cpu_winograd", [&] {
    done = winograd_forward<scalar_t>(s, plan.isa, input, weight, bias, out, argmax, need_argmax);
  });
  return done;
}

}  // namespace cpu
}  // namespace lightnet_ops

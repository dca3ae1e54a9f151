// CPU kernels for linear_relu (float32, float64).
//
// Forward: one GEMM, then bias and ReLU. Backward: one pass gates grad_output by the saved output
// and, in the same pass, sums the bias gradient; then the two GEMMs (grad_input = gated @ W,
// grad_weight = gated^T @ X).
//
// The GEMMs are either BLAS calls (at::mm: MKL in PyTorch's x86 wheels) or this file's
// register-blocked kernel (cpu_gemm_kernels.h), which applies the bias and ReLU to each tile in
// registers and reads W^T and gated^T without materialising them. use_native_gemm chooses.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "lightnet_ops/linear_relu.h"
#include "lightnet_ops/cpu_linear.h"
#include "lightnet_ops/cpu_simd.h"
#include "lightnet_ops/window_math.h"

#if LIGHTNET_OPS_X86_DISPATCH
#include <immintrin.h>  // broadcasts, used only inside the AVX2 / AVX-512 target regions
#endif

namespace lightnet_ops {
namespace cpu {

// C (M x N, row stride ldc) = A (M x K) @ B (K x N), then + bias[j] and ReLU if asked.
// A(i, k) = a[i * a_row + k * a_col]; B(k, j) = b[k * ldb + j], or b[j * ldb + k] if b_transposed.
template <typename T>
struct GemmArgs {
  const T* a;
  int64_t a_row, a_col;
  const T* b;
  int64_t ldb;
  bool b_transposed;
  T* c;
  int64_t ldc;
  int64_t M, N, K;
  const T* bias;  // null: none
  bool relu;
};

}  // namespace cpu
}  // namespace lightnet_ops

// The GEMM kernel, once per instruction set (see cpu_simd.h).
#define LIGHTNET_OPS_KERNELS_HEADER "lightnet_ops/cpu_gemm_kernels.h"
#include "lightnet_ops/cpu_isa_variants.h"

namespace lightnet_ops {
namespace {

void check_cpu_dtype(const at::Tensor& t, const char* op) {
  check_backend_dtype(op, t, "cpu", {at::kFloat, at::kDouble}, "float32 and float64");
}

// What the last linear_relu forward / backward on this thread ran (the `_cpu_linear_last_run`
// debug op): the GEMM (native or BLAS), the instruction set, and for the backward whether the two
// GEMMs ran side by side.
// The GEMM kinds: BLAS (at::mm), the register-blocked tiles ("native"), the few-row dot products.
enum class Gemm { kBlas, kNative, kDot };

const char* gemm_name(Gemm gemm) { return gemm == Gemm::kNative ? "native" : gemm == Gemm::kDot ? "dot" : "blas"; }

struct LinearRun {
  Gemm gemm = Gemm::kBlas;
  cpu::Isa isa = cpu::Isa::kDefault;
  bool side_by_side = false;
};
thread_local std::optional<LinearRun> last_forward, last_backward;

std::string describe(const LinearRun& run, bool backward) {
  std::string out = std::string("gemm=") + gemm_name(run.gemm) + " isa=" + cpu::isa_name(run.isa);
  if (backward) out += std::string(" side_by_side=") + (run.side_by_side ? "1" : "0");
  return out;
}

std::tuple<std::string, std::string> cpu_linear_last_run() {
  return {last_forward ? describe(*last_forward, false) : std::string(),
          last_backward ? describe(*last_backward, true) : std::string()};
}

// Rows per block of the backward gate pass, the unit of its bias-gradient partial sums. Fixed (not
// derived from the thread count) so that the sums, and hence the result, do not depend on it.
constexpr int64_t kRowsPerBlock = 32;

// The register-blocked GEMM for this CPU (and LIGHTNET_OPS_CPU_ISA): `run` computes column blocks
// [jb0, jb1) of C on the calling thread; a column block is `block_columns` wide.
template <typename T>
struct GemmKernel {
  void (*run)(const cpu::GemmArgs<T>&, int64_t, int64_t);
  int64_t block_columns;
};

template <typename T>
GemmKernel<T> gemm_kernel(cpu::Isa isa, Gemm gemm) {
  const bool dot = gemm == Gemm::kDot;
#if LIGHTNET_OPS_X86_DISPATCH
  if (isa == cpu::Isa::kAvx512) {
    if (dot) return {&cpu::isa_avx512::gemm_dot_column_blocks<T>, cpu::isa_avx512::kDotCols};
    return {&cpu::isa_avx512::gemm_column_blocks<T>, cpu::isa_avx512::gemm_block_columns<T>()};
  }
  if (isa == cpu::Isa::kAvx2) {
    if (dot) return {&cpu::isa_avx2::gemm_dot_column_blocks<T>, cpu::isa_avx2::kDotCols};
    return {&cpu::isa_avx2::gemm_column_blocks<T>, cpu::isa_avx2::gemm_block_columns<T>()};
  }
#endif
  if (dot) return {&cpu::isa_default::gemm_dot_column_blocks<T>, cpu::isa_default::kDotCols};
  return {&cpu::isa_default::gemm_column_blocks<T>, cpu::isa_default::gemm_block_columns<T>()};
}

// The problem restricted to C's rows [row0, row1).
template <typename T>
cpu::GemmArgs<T> rows_of(const cpu::GemmArgs<T>& g, int64_t row0, int64_t row1) {
  cpu::GemmArgs<T> part = g;
  part.M = row1 - row0;
  part.a = g.a + row0 * g.a_row;
  part.c = g.c + row0 * g.ldc;
  return part;
}

// Rows per chunk when native_gemm splits the rows too: a chunk repacks its blocks' W^T panels, a
// small cost next to this many rows of products.
constexpr int64_t kMinChunkRows = 32;

// The GEMM on the calling thread (parallel = false) or split across the threads, at least about
// 2^18 multiply-adds per task (below that, waking a thread costs what it saves). Tasks are column
// blocks; with few blocks (N of a few vectors) the rows are split into chunks too, so that no thread
// idles (3 blocks on 2 threads left one idle a third of the time: 1024 x 1000 -> 84 ran 0.88x stock).
// Each output is computed whole by one task either way, so the split does not change results.
template <typename T>
void native_gemm(const cpu::GemmArgs<T>& g, cpu::Isa isa, bool parallel, Gemm gemm = Gemm::kNative) {
  const GemmKernel<T> kernel = gemm_kernel<T>(isa, gemm);
  const int64_t blocks = (g.N + kernel.block_columns - 1) / kernel.block_columns;
  if (!parallel) {
    kernel.run(g, 0, blocks);
    return;
  }
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = blocks >= 4 * threads ? 1 : std::clamp<int64_t>(g.M / kMinChunkRows, 1, threads);
  const int64_t chunk_rows = (g.M + chunks - 1) / chunks;
  const int64_t task_macs = std::max<int64_t>(1, chunk_rows * g.K * kernel.block_columns);
  const int64_t grain = std::max<int64_t>(1, ((int64_t(1) << 18) + task_macs - 1) / task_macs);
  // Task t is column block t % blocks of row chunk t / blocks: a thread's consecutive tasks share
  // a chunk, and run as one call per chunk.
  at::parallel_for(0, chunks * blocks, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1;) {
      const int64_t chunk = t / blocks, b0 = t % blocks, b1 = std::min(blocks, b0 + (t1 - t));
      const int64_t row0 = chunk * chunk_rows;
      const cpu::GemmArgs<T> part = rows_of(g, row0, std::min(g.M, row0 + chunk_rows));
      if (part.M > 0) kernel.run(part, b0, b1);
      t += b1 - b0;
    }
  });
}

// Which GEMM linear_relu's products use. The project's kernels (AVX-512, float32; other CPUs /
// dtypes were not measured) have no call overhead and keep bias and ReLU in registers, but no
// cache blocking and a simple split across threads. Which side wins depends on the BLAS: torch's
// x86 builds call MKL, which runs its tuned code on Intel CPUs only. Measured against stock on
// three machines (benchmarks/results/NOTES.md has the grids), the bounds come in two sets:
//
// On Intel CPUs (2-core Xeon), MKL is fast and the project's kernels win on small problems only:
// - forward, at least 64 rows: the blocked kernel up to 2^22 multiply-adds (it packs W^T per
//   call, which costs more than a product of fewer rows);
// - forward, fewer rows: the dot-product kernel, which reads W in place, where each dot product is
//   long enough to repay its lane reduction (K >= 32 * M) and the outputs are not many short dot
//   products (N <= 8 * K: 1 x 120 -> 4096 ran 0.74x stock);
// - backward (no W^T to pack): the blocked kernel from 4 rows up to 2^21 multiply-adds, with
//   N <= 8 * K (4 x 120 -> 4096 ran 0.59x);
// On other CPUs (AMD EPYC), MKL's small and skinny products are slow (8 x 84 -> 10 took 7 us) and
// the project's kernels win far more widely:
// - forward, at least 64 rows: the blocked kernel up to 2^34 multiply-adds (4096 x 1024 -> 4096,
//   2^34, ran 1.13-1.16x against BLAS's 1.08x: the bound is where the measurements stop);
// - forward, fewer rows: the dot-product kernel where N <= 8 * K and K >= 32 * M, or for a small
//   layer (K * N <= 2^14) below 8 rows; else the blocked kernel from 8 rows where N <= 8 * K;
// - backward: the blocked kernel from 4 rows up to 2^28 multiply-adds, with N <= 8 * K below 16
//   rows (4.3G multiply-adds ran 0.64-0.98x).
// Everything else, and other dtypes / instruction sets: BLAS (at::mm / at::addmm, as stock).
// Both sets were measured on 2-core VMs; a many-core CPU may favour BLAS's cache blocking and
// thread split at smaller sizes than these bounds.
// LIGHTNET_OPS_CPU_GEMM=native|dot|blas overrides the choice (dot: the forward only; tests cover
// each, and float64); LIGHTNET_OPS_CPU_BLAS=tuned|generic overrides which set of bounds applies.
constexpr int64_t kDotMinDepthPerRow = 32;
constexpr int64_t kMaxColumnsPerDepth = 8;

std::optional<Gemm> forced_gemm(bool forward) {
  const char* env = std::getenv("LIGHTNET_OPS_CPU_GEMM");
  if (env == nullptr) return std::nullopt;
  const std::string v(env);
  if (v == "native") return Gemm::kNative;
  if (v == "blas") return Gemm::kBlas;
  if (v == "dot") return forward ? std::optional<Gemm>(Gemm::kDot) : std::nullopt;
  return std::nullopt;
}

// Whether BLAS runs code tuned for this CPU: an Intel CPU (MKL's own), unless
// LIGHTNET_OPS_CPU_BLAS=tuned|generic says otherwise (read per call, so that a test can switch it).
bool blas_tuned_for_this_cpu() {
  if (const int forced = cpu::env_choice("LIGHTNET_OPS_CPU_BLAS", "tuned", "generic"); forced >= 0) return forced == 1;
  return cpu::cpu_is_intel();
}

bool project_gemm_runs(at::ScalarType dtype, cpu::Isa isa) { return dtype == at::kFloat && isa == cpu::Isa::kAvx512; }

Gemm forward_gemm(at::ScalarType dtype, cpu::Isa isa, int64_t M, int64_t N, int64_t K) {
  if (const auto forced = forced_gemm(true)) return *forced;
  if (!project_gemm_runs(dtype, isa)) return Gemm::kBlas;
  const int64_t macs = M * N * K;
  const bool not_wide = N <= kMaxColumnsPerDepth * K;
  if (blas_tuned_for_this_cpu()) {
    if (M >= 64) return macs <= (int64_t(1) << 22) ? Gemm::kNative : Gemm::kBlas;
    return K >= kDotMinDepthPerRow * M && not_wide ? Gemm::kDot : Gemm::kBlas;
  }
  if (M >= 64) return macs <= (int64_t(1) << 34) ? Gemm::kNative : Gemm::kBlas;
  if (not_wide && (K >= kDotMinDepthPerRow * M || (M < 8 && K * N <= (int64_t(1) << 14)))) return Gemm::kDot;
  return M >= 8 && not_wide ? Gemm::kNative : Gemm::kBlas;
}

bool use_native_gemm_backward(const at::Tensor& input, cpu::Isa isa, int64_t M, int64_t N, int64_t K) {
  if (const auto forced = forced_gemm(false)) return *forced == Gemm::kNative;
  if (!project_gemm_runs(input.scalar_type(), isa) || M < 4) return false;
  const int64_t macs = M * N * K;
  const bool not_wide = N <= kMaxColumnsPerDepth * K;
  if (blas_tuned_for_this_cpu()) return macs <= (int64_t(1) << 21) && not_wide;
  return macs <= (int64_t(1) << 28) && (not_wide || M >= 16);
}

// out[i, :] = relu(out[i, :] + bias) in place; bias may be null.
template <typename scalar_t>
void bias_relu_inplace(scalar_t* out, const scalar_t* bias, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* row = out + r * cols;
      if (bias != nullptr) {
        for (int64_t c = 0; c < cols; ++c) row[c] = relu(row[c] + bias[c]);
      } else {
        for (int64_t c = 0; c < cols; ++c) row[c] = relu(row[c]);
      }
    }
  });
}

// gated = grad where the ReLU passed it (output not <= 0), else 0; if bias_grad is not null, also
// its column sums. Row blocks of kRowsPerBlock write partial column sums, added in block order.
template <typename scalar_t>
void gate_and_sum(const scalar_t* grad, const scalar_t* output, scalar_t* gated, scalar_t* bias_grad, int64_t rows,
                  int64_t cols) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<scalar_t> partial(bias_grad != nullptr ? blocks * cols : 0);
  // At least ~16K elements per task: smaller passes run on the calling thread (waking a worker
  // costs more than the pass).
  const int64_t grain = std::max<int64_t>(1, 16384 / (kRowsPerBlock * std::max<int64_t>(cols, 1)));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      scalar_t* sums = bias_grad != nullptr ? partial.data() + blk * cols : nullptr;
      if (sums != nullptr) std::fill(sums, sums + cols, scalar_t(0));
      const int64_t r_end = std::min(rows, (blk + 1) * kRowsPerBlock);
      for (int64_t r = blk * kRowsPerBlock; r < r_end; ++r) {
        const scalar_t* g = grad + r * cols;
        const scalar_t* o = output + r * cols;
        scalar_t* d = gated + r * cols;
        // Both loads are unconditional: a conditional load of g[c] keeps GCC from vectorising.
        if (sums != nullptr) {
          for (int64_t c = 0; c < cols; ++c) {
            const scalar_t gv = g[c], ov = o[c];
            const scalar_t v = relu_passes_grad(ov) ? gv : scalar_t(0);
            d[c] = v;
            sums[c] += v;
          }
        } else {
          for (int64_t c = 0; c < cols; ++c) {
            const scalar_t gv = g[c], ov = o[c];
            d[c] = relu_passes_grad(ov) ? gv : scalar_t(0);
          }
        }
      }
    }
  });
  if (bias_grad == nullptr) return;
  std::fill(bias_grad, bias_grad + cols, scalar_t(0));
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const scalar_t* sums = partial.data() + blk * cols;
    for (int64_t c = 0; c < cols; ++c) bias_grad[c] += sums[c];
  }
}

// relu(input @ weight^T + bias), or without the ReLU (relu = false: _linear_no_grad).
at::Tensor linear_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      bool relu, const char* op) {
  check_linear_relu(op, input, weight, bias);
  check_cpu_dtype(input, op);
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  const cpu::Isa isa = cpu::cpu_isa();
  const Gemm gemm = forward_gemm(input.scalar_type(), isa, M, N, K);
  last_forward = LinearRun{gemm, isa, false};
  if (gemm != Gemm::kBlas) {
    // out = epilogue(X @ W^T + bias), the bias and ReLU applied in registers.
    const at::Tensor x = input.contiguous(), w = weight.contiguous();
    at::Tensor out = at::empty({M, N}, input.options());
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "linear_relu_cpu_native", [&] {
      native_gemm<scalar_t>({x.const_data_ptr<scalar_t>(), K, 1, w.const_data_ptr<scalar_t>(), K, true,
                             out.mutable_data_ptr<scalar_t>(), N, M, N, K,
                             has_bias ? b.const_data_ptr<scalar_t>() : nullptr, relu},
                            isa, true, gemm);
    });
    return out;
  }
  if (!relu) return has_bias ? at::addmm(b, input, weight.t()) : at::mm(input, weight.t());
  at::Tensor out = at::mm(input, weight.t());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "linear_relu_cpu", [&] {
    bias_relu_inplace<scalar_t>(out.mutable_data_ptr<scalar_t>(), has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
                                out.size(0), out.size(1));
  });
  return out;
}

}  // namespace

bool linear_rows_would_run(at::ScalarType dtype, int64_t M, int64_t N, int64_t K) {
  return forward_gemm(dtype, cpu::cpu_isa(), M, N, K) != Gemm::kBlas;
}

std::function<void(int64_t, int64_t)> prepare_linear_rows(const at::Tensor& input, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias, bool relu,
                                                          at::Tensor& out) {
  const char* op = relu ? "linear_relu" : "_linear_no_grad";
  check_linear_relu(op, input, weight, bias);
  check_cpu_dtype(input, op);
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  if (!input.is_contiguous() || !weight.is_contiguous() || (has_bias && !bias->is_contiguous()) ||
      !out.is_contiguous() || out.sizes() != at::IntArrayRef{M, N} || out.scalar_type() != input.scalar_type()) {
    return {};
  }
  const cpu::Isa isa = cpu::cpu_isa();
  const Gemm gemm = forward_gemm(input.scalar_type(), isa, M, N, K);
  if (gemm == Gemm::kBlas) return {};
  last_forward = LinearRun{gemm, isa, false};
  std::function<void(int64_t, int64_t)> rows;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "linear_relu_cpu_rows", [&] {
    const cpu::GemmArgs<scalar_t> g{input.const_data_ptr<scalar_t>(), K, 1, weight.const_data_ptr<scalar_t>(), K, true,
                                    out.mutable_data_ptr<scalar_t>(), N, M, N, K,
                                    has_bias ? bias->const_data_ptr<scalar_t>() : nullptr, relu};
    const GemmKernel<scalar_t> kernel = gemm_kernel<scalar_t>(isa, gemm);
    const int64_t blocks = (N + kernel.block_columns - 1) / kernel.block_columns;
    rows = [g, kernel, blocks](int64_t begin, int64_t end) { kernel.run(rows_of(g, begin, end), 0, blocks); };
  });
  return rows;
}

namespace {

at::Tensor linear_relu_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return linear_cpu(input, weight, bias, true, "linear_relu");
}

// _linear_no_grad: the project's GEMMs for what they take (2-D float32 / float64 input, a 1-D
// bias or none); anything else as at::linear does it (leading dimensions, a 0-d bias, other dtypes).
at::Tensor linear_no_grad_cpu(const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  const bool plain = input.dim() == 2 && (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble) &&
                     (!bias.has_value() || !bias->defined() || bias->dim() == 1);
  return plain ? linear_cpu(input, weight, bias, false, "_linear_no_grad") : at::linear(input, weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_cpu(const at::Tensor& grad_output,
                                                                        const at::Tensor& input,
                                                                        const at::Tensor& weight,
                                                                        const at::Tensor& output,
                                                                        std::array<bool, 3> output_mask) {
  check_linear_relu_backward("linear_relu_backward", grad_output, input, weight, output);
  check_cpu_dtype(input, "linear_relu_backward");
  const auto g = grad_output.contiguous();
  const auto o = output.contiguous();
  auto gated = at::empty_like(g, at::MemoryFormat::Contiguous);
  // Each masked-off output is its own empty tensor: outputs must not alias.
  const auto empty = [&] { return at::empty({0}, input.options()); };
  at::Tensor grad_bias = output_mask[2] ? at::empty({weight.size(0)}, input.options()) : empty();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "linear_relu_backward_cpu", [&] {
    gate_and_sum<scalar_t>(g.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
                           gated.mutable_data_ptr<scalar_t>(),
                           output_mask[2] ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr, g.size(0), g.size(1));
  });
  at::Tensor grad_input = empty(), grad_weight = empty();
  // The two GEMMs have the same size (M * out * in multiply-adds) and are independent. Between
  // kMinSideBySideMacs and kMaxSideBySideMacs, run them side by side, one thread each, instead of
  // splitting each across the threads: below, waking the second thread costs what it saves; above,
  // the two compete for the shared cache and memory bandwidth, and each splits well on its own.
  // Nested ATen/BLAS calls inside parallel_for run single-threaded.
  constexpr int64_t kMinSideBySideMacs = int64_t(1) << 22;
  constexpr int64_t kMaxSideBySideMacs = int64_t(1) << 27;
  const int64_t macs = input.size(0) * input.size(1) * weight.size(0);
  const bool side_by_side = output_mask[0] && output_mask[1] && macs >= kMinSideBySideMacs &&
                            macs <= kMaxSideBySideMacs && at::get_num_threads() >= 2 && !at::in_parallel_region();
  const int64_t M = input.size(0), K = input.size(1), N = weight.size(0);
  const cpu::Isa isa = cpu::cpu_isa();
  const bool native = use_native_gemm_backward(input, isa, M, N, K);
  last_backward = LinearRun{native ? Gemm::kNative : Gemm::kBlas, isa, side_by_side};
  if (native) {
    const at::Tensor x = input.contiguous(), w = weight.contiguous();
    if (output_mask[0]) grad_input = at::empty({M, K}, input.options());
    if (output_mask[1]) grad_weight = at::empty({N, K}, input.options());
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "linear_relu_backward_cpu_native", [&] {
      const scalar_t* gd = gated.const_data_ptr<scalar_t>();
      // grad_input (M x K) = gated (M x N) @ W (N x K); grad_weight (N x K) = gated^T @ X (M x K).
      const cpu::GemmArgs<scalar_t> gi{gd, N, 1, w.const_data_ptr<scalar_t>(), K, false,
                                       output_mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr,
                                       K, M, K, N, nullptr, false};
      const cpu::GemmArgs<scalar_t> gw{gd, 1, N, x.const_data_ptr<scalar_t>(), K, false,
                                       output_mask[1] ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr,
                                       K, N, K, M, nullptr, false};
      if (side_by_side) {
        at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
          for (int64_t task = begin; task < end; ++task) native_gemm<scalar_t>(task == 0 ? gi : gw, isa, false);
        });
      } else {
        if (output_mask[0]) native_gemm<scalar_t>(gi, isa, true);
        if (output_mask[1]) native_gemm<scalar_t>(gw, isa, true);
      }
    });
  } else if (side_by_side) {
    grad_input = at::empty({input.size(0), input.size(1)}, input.options());
    grad_weight = at::empty({weight.size(0), weight.size(1)}, input.options());
    at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
      // Worker threads do not inherit the caller's dispatch state: skip autograd there too.
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t task = begin; task < end; ++task) {
        if (task == 0) {
          at::mm_out(grad_input, gated, weight);
        } else {
          at::mm_out(grad_weight, gated.t(), input);
        }
      }
    });
  } else {
    if (output_mask[0]) grad_input = at::mm(gated, weight);
    if (output_mask[1]) grad_weight = at::mm(gated.t(), input);
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(lightnet_ops, CPU, m) {
  m.impl("linear_relu", &linear_relu_cpu);
  m.impl("_linear_no_grad", &linear_no_grad_cpu);
  m.impl("linear_relu_backward", &linear_relu_backward_cpu);
}

// Debug op of the CPU backend (not part of the public API): what the last calls ran.
TORCH_LIBRARY_FRAGMENT(lightnet_ops, m) { m.def("_cpu_linear_last_run() -> (str, str)", &cpu_linear_last_run); }

}  // namespace lightnet_ops

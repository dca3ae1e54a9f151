// Argument checks of the compiled ops (CPU and CUDA, forward and backward): the one C++ copy.
// Messages and exception types are those of the Python checker (lightnet_ops/ops/<op>.py), so a
// caller sees the same ValueError / TypeError whichever layer rejects its arguments: each names
// the op, the argument, the expected and the actual value, with Python's spelling of shapes
// ((2, 3) / [2, 3]) and dtypes (torch.float32).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cctype>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <ostream>
#include <string>

#include "lightnet_ops/window_math.h"

namespace lightnet_ops {

// Sizes of one conv2d_relu_maxpool2d problem. Layout names: N batch, C input channels,
// K output channels, H x W input, R x S filter, P x Q conv output, PH x PW pooled output.
struct ConvPoolShape {
  int64_t N, C, H, W;
  int64_t K, R, S;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t P, Q;                // conv output (never materialised by the fused paths)
  int64_t pool_kh, pool_kw, pool_sh, pool_sw;
  int64_t PH, PW;              // pooled output
};

namespace checks {

// `(2, 3)`, `(5,)`: Python's repr of tuple(tensor.shape).
struct PyTuple {
  at::IntArrayRef v;
};
inline std::ostream& operator<<(std::ostream& os, PyTuple t) {
  os << '(';
  for (size_t i = 0; i < t.v.size(); ++i) os << (i ? ", " : "") << t.v[i];
  return os << (t.v.size() == 1 ? ",)" : ")");
}

// `torch.float32`: Python's repr of a dtype.
struct PyDtype {
  at::ScalarType t;
};
inline std::ostream& operator<<(std::ostream& os, PyDtype d) {
  switch (d.t) {
    case at::kFloat: return os << "torch.float32";
    case at::kDouble: return os << "torch.float64";
    case at::kHalf: return os << "torch.float16";
    case at::kBFloat16: return os << "torch.bfloat16";
    case at::kLong: return os << "torch.int64";
    case at::kInt: return os << "torch.int32";
    case at::kShort: return os << "torch.int16";
    case at::kChar: return os << "torch.int8";
    case at::kByte: return os << "torch.uint8";
    case at::kBool: return os << "torch.bool";
    case at::kComplexHalf: return os << "torch.complex32";
    case at::kComplexFloat: return os << "torch.complex64";
    case at::kComplexDouble: return os << "torch.complex128";
    default: {
      std::string name = c10::toString(d.t);
      for (char& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      return os << "torch." << name;
    }
  }
}

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// `other` has input's dtype and device (Python: check_same).
inline void check_same(const char* op, const at::Tensor& input, const at::Tensor& other, const char* name) {
  TORCH_CHECK_VALUE(other.scalar_type() == input.scalar_type(), op, ": input dtype ", PyDtype{input.scalar_type()},
                    " does not match ", name, " dtype ", PyDtype{other.scalar_type()});
  TORCH_CHECK_VALUE(other.device() == input.device(), op, ": input is on ", input.device(), " but ", name, " is on ",
                    other.device());
}

inline void check_floating(const char* op, const at::Tensor& input) {
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()), op, ": expected a floating-point input, got ",
                   PyDtype{input.scalar_type()});
}

// (in + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1 without int64 overflow, for any
// sizes the schema's int64 arguments can carry (a valid call may pass stride = 2**40).
inline int64_t checked_conv_out_size(const char* op, int64_t in, int64_t kernel, int64_t stride, int64_t padding,
                                     int64_t dilation) {
  const __int128 span = __int128(in) + 2 * __int128(padding) - __int128(dilation) * (kernel - 1) - 1;
  // Floor division, as Python's //: a negative span gives a size <= 0 (rejected by the caller).
  __int128 q = span / stride;
  if (span % stride != 0 && span < 0) q -= 1;
  const __int128 out = q + 1;
  TORCH_CHECK_VALUE(out <= std::numeric_limits<int64_t>::max(), op, ": conv output size overflows int64 (input ", in,
                    ", padding ", padding, ")");
  return out < std::numeric_limits<int64_t>::min() ? std::numeric_limits<int64_t>::min() : int64_t(out);
}

}  // namespace checks

// Validates conv2d_relu_maxpool2d's arguments and returns the problem's sizes: input (N, C, H, W),
// weight (K, C, R, S), bias (K) or none, every int list of 2 elements. `op` prefixes the messages
// (the forward's name, or the backward's).
inline ConvPoolShape check_conv2d_relu_maxpool2d(const char* op, const at::Tensor& input, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                                 at::IntArrayRef pool_kernel_size, at::IntArrayRef pool_stride) {
  using checks::PyTuple;
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": expected 4-D input (N, C, H, W), got ", input.dim(),
                    "-D input of shape ", PyTuple{input.sizes()});
  TORCH_CHECK_VALUE(weight.dim() == 4, op, ": expected 4-D weight (out_channels, in_channels, kH, kW), got ",
                    PyTuple{weight.sizes()});
  checks::check_floating(op, input);
  checks::check_same(op, input, weight, "weight");
  TORCH_CHECK_VALUE(input.size(1) == weight.size(1), op, ": input has ", input.size(1), " channels but weight expects ",
                    weight.size(1), " (groups=1 only)");
  if (checks::has(bias)) {
    checks::check_same(op, input, *bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [",
                      weight.size(0), "], got ", bias->sizes());
  }
  const struct {
    const char* name;
    at::IntArrayRef v;
    int64_t low;
  } lists[] = {{"stride", stride, 1},
               {"padding", padding, 0},
               {"dilation", dilation, 1},
               {"pool_kernel_size", pool_kernel_size, 1},
               {"pool_stride", pool_stride, 1}};
  for (const auto& l : lists) {
    TORCH_CHECK_VALUE(l.v.size() == 2, op, ": ", l.name, " must have 2 elements, got ", l.v);
    TORCH_CHECK_VALUE(l.v[0] >= l.low && l.v[1] >= l.low, op, ": ", l.name, " must be ",
                      l.low ? "positive" : "non-negative", ", got ", l.v);
  }
  // Each factor is at least 1, so a factor above the limit decides before the product can overflow.
  TORCH_CHECK_VALUE(pool_kernel_size[0] <= kMaxPoolWindow && pool_kernel_size[1] <= kMaxPoolWindow &&
                        pool_kernel_size[0] * pool_kernel_size[1] <= kMaxPoolWindow,
                    op, ": pool window ", pool_kernel_size, " has more than ", kMaxPoolWindow,
                    " elements; the one-byte argmax cannot address it");
  TORCH_CHECK_VALUE(weight.size(2) > 0 && weight.size(3) > 0, op, ": kernel size must be positive, got ",
                    weight.sizes());
  ConvPoolShape s;
  s.N = input.size(0);
  s.C = input.size(1);
  s.H = input.size(2);
  s.W = input.size(3);
  s.K = weight.size(0);
  s.R = weight.size(2);
  s.S = weight.size(3);
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dil_h = dilation[0];
  s.dil_w = dilation[1];
  s.P = checks::checked_conv_out_size(op, s.H, s.R, s.stride_h, s.pad_h, s.dil_h);
  s.Q = checks::checked_conv_out_size(op, s.W, s.S, s.stride_w, s.pad_w, s.dil_w);
  TORCH_CHECK_VALUE(s.P > 0 && s.Q > 0, op, ": input of spatial size (", s.H, ", ", s.W, ") is too small for kernel (",
                    s.R, ", ", s.S, ") with padding ", padding, " and dilation ", dilation);
  s.pool_kh = pool_kernel_size[0];
  s.pool_kw = pool_kernel_size[1];
  s.pool_sh = pool_stride[0];
  s.pool_sw = pool_stride[1];
  TORCH_CHECK_VALUE(s.pool_kh <= s.P && s.pool_kw <= s.Q, op, ": pool window (", s.pool_kh, ", ", s.pool_kw,
                    ") is larger than the conv output (", s.P, ", ", s.Q, ")");
  s.PH = pool_out_size(s.P, s.pool_kh, s.pool_sh);
  s.PW = pool_out_size(s.Q, s.pool_kw, s.pool_sw);
  return s;
}

// Validates conv2d_relu_maxpool2d_backward's arguments: those of the forward (no bias), then
// grad_output (N, K, PH, PW) and the forward's argmax (uint8, same shape).
inline ConvPoolShape check_conv2d_relu_maxpool2d_backward(const char* op, const at::Tensor& grad_output,
                                                          const at::Tensor& input, const at::Tensor& weight,
                                                          const at::Tensor& argmax, at::IntArrayRef stride,
                                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                                          at::IntArrayRef pool_kernel_size,
                                                          at::IntArrayRef pool_stride) {
  const ConvPoolShape s = check_conv2d_relu_maxpool2d(op, input, weight, std::nullopt, stride, padding, dilation,
                                                      pool_kernel_size, pool_stride);
  checks::check_same(op, input, grad_output, "grad_output");
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({s.N, s.K, s.PH, s.PW}), op, ": grad_output has shape ",
                    grad_output.sizes(), ", expected [", s.N, ", ", s.K, ", ", s.PH, ", ", s.PW, "]");
  TORCH_CHECK_TYPE(argmax.scalar_type() == at::kByte, op, ": argmax must be uint8 (torch.uint8), got ",
                   checks::PyDtype{argmax.scalar_type()});
  TORCH_CHECK_VALUE(argmax.device() == input.device(), op, ": input is on ", input.device(), " but argmax is on ",
                    argmax.device());
  TORCH_CHECK_VALUE(argmax.sizes() == grad_output.sizes(), op, ": argmax has shape ", argmax.sizes(), ", expected ",
                    grad_output.sizes(), " (was the forward run with need_argmax=true?)");
  return s;
}

// Validates linear_relu's arguments: input (M, in_features) (the Python API flattens leading
// dimensions), weight (out_features, in_features), bias (out_features) or none.
inline void check_linear_relu(const char* op, const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  using checks::PyTuple;
  TORCH_CHECK_VALUE(input.dim() == 2, op, ": the op expects 2-D input (M, in_features), got ", PyTuple{input.sizes()},
                    " (the Python API flattens leading dimensions)");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": expected 2-D weight (out_features, in_features), got ",
                    PyTuple{weight.sizes()});
  checks::check_floating(op, input);
  checks::check_same(op, input, weight, "weight");
  TORCH_CHECK_VALUE(input.size(1) == weight.size(1), op, ": input has ", input.size(1), " features but weight expects ",
                    weight.size(1));
  if (checks::has(bias)) {
    checks::check_same(op, input, *bias, "bias");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [",
                      weight.size(0), "], got ", bias->sizes());
  }
}

// Validates linear_relu_backward's arguments: those of the forward (no bias), then grad_output
// and the forward's output (the ReLU gate), both (M, out_features).
inline void check_linear_relu_backward(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                                       const at::Tensor& weight, const at::Tensor& output) {
  check_linear_relu(op, input, weight, std::nullopt);
  const int64_t want[2] = {input.size(0), weight.size(0)};
  const auto check = [&](const at::Tensor& t, const char* name) {
    checks::check_same(op, input, t, name);
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(want), op, ": ", name, " has shape ", t.sizes(), ", expected ",
                      at::IntArrayRef(want));
  };
  check(grad_output, "grad_output");
  check(output, "output");
}

// The dtypes one backend's kernels take (a TypeError naming the others' way out otherwise).
inline void check_backend_dtype(const char* op, const at::Tensor& input, const char* backend,
                                std::initializer_list<at::ScalarType> supported, const char* supported_names) {
  bool ok = false;
  for (const auto t : supported) ok = ok || input.scalar_type() == t;
  TORCH_CHECK_TYPE(ok, op, ": the ", backend, " backend supports ", supported_names, ", got ",
                   checks::PyDtype{input.scalar_type()}, " (use backend=\"reference\" for other dtypes)");
}

}  // namespace lightnet_ops

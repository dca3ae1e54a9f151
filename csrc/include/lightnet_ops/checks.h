// What the compiled ops' argument checkers share. Each op's checker is in its file (csrc/<op>.cpp,
// declared in lightnet_ops/<op>.h for its CPU and CUDA kernels), the one C++ copy of the Python
// checker in its contract (lightnet_ops/ops/<op>.py). Messages and exception types are the Python
// checker's, so a caller sees the same ValueError / TypeError whichever layer rejects its
// arguments: each names the op, the argument, the expected and the actual value, with Python's
// spelling of shapes ((2, 3) / [2, 3]) and dtypes (torch.float32).
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

// Sizes of one conv2d_relu_maxpool2d problem, as its checker returns them (here rather than in
// conv2d_relu_maxpool2d.h because the CPU planner's header, cpu_conv_plan.h, names it and includes
// this header only). Layout names: N batch, C input channels, K output channels, H x W input,
// R x S filter, P x Q conv output, PH x PW pooled output.
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

// The dtypes one backend's kernels take (a TypeError naming the others' way out otherwise).
inline void check_backend_dtype(const char* op, const at::Tensor& input, const char* backend,
                                std::initializer_list<at::ScalarType> supported, const char* supported_names) {
  bool ok = false;
  for (const auto t : supported) ok = ok || input.scalar_type() == t;
  TORCH_CHECK_TYPE(ok, op, ": the ", backend, " backend supports ", supported_names, ", got ",
                   checks::PyDtype{input.scalar_type()}, " (use backend=\"reference\" for other dtypes)");
}

}  // namespace lightnet_ops

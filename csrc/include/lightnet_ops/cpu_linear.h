// The CPU linear_relu / _linear_no_grad forward prepared for a caller that splits the rows itself:
// convnet_forward's inference (csrc/convnet.cpp), which runs every layer of a batch's slice of
// samples in one parallel region. Defined in csrc/cpu/linear_relu.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>

namespace lightnet_ops {

// Whether prepare_linear_rows would prepare rows (not BLAS) for M rows of a K -> N layer of this
// dtype, under the current overrides: the cheap question to ask before preparing anything else.
bool linear_rows_would_run(at::ScalarType dtype, int64_t M, int64_t N, int64_t K);

// rows(begin, end) computes rows [begin, end) of out = relu?(input @ weight^T + bias) on the
// calling thread, by the project GEMM the op itself would run for all of input's rows (so each
// output equals the op's bitwise: a kernel computes every output whole, whatever the row split).
// Empty where the op would call BLAS (whose results may depend on the rows it is given) or where
// an operand is not contiguous, or out is not the contiguous (M, N) result. Checks the arguments
// as the op does (same errors). input, weight, bias and out must outlive `rows`; input's rows
// may be written between the call and running them.
std::function<void(int64_t, int64_t)> prepare_linear_rows(const at::Tensor& input, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias, bool relu,
                                                          at::Tensor& out);

}  // namespace lightnet_ops

"""Triton kernels for ``relu(linear(x, w, b))`` and its backward.

One strided GEMM kernel, C = epilogue(A' @ B), serves all three products; strides express the
transposes, so nothing is copied:
  forward       out (M, O)  = relu(x @ w.T + b)          A = x,           B = w.T, bias + ReLU epilogue
  grad_input    gi  (M, I)  = gate(g) @ w                A = gate(g),     B = w
  grad_weight   gw  (O, I)  = gate(g).T @ x              A = gate(g).T,   B = x, split along M
                gb  (O)     = gate(g).sum(0)             fused: row sums of the A tiles it already loads
gate(g) = where(out <= 0, 0, g) is applied while loading A (ReLU-mask gating fused; NaN outputs pass
the gradient, like stock's threshold_backward). Accumulation is float32; float32 operands use IEEE
(not TF32) products. NaN and infinity land where stock's dense GEMMs put them: there is no padding,
and a masked tail lane is 0 in both operands, so it never multiplies a non-finite value.

`forward` / `backward` take the arguments of the contract's schemas (lightnet_ops/ops/linear_relu.py)
and are what the ``triton`` backend registers; `aot_jobs` lists the kernel's compile jobs for ``aot_check``.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..ops import linear_relu as contract
from ._common import (INTERP_CONFIG, INTERPRET, AotJob, aot_configs, aot_flags, autotune, cfg, channel_sum,
                      check_runnable, dot_flags, mma, on_device, relu_keep_nan)

_GEMM_CONFIGS = [
    cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4),
    cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=4),
    cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4),
    cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=4),
    cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4),
    cfg(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=3),
    cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=2, num_stages=3),
]


# sizes are not specialized on (one compile serves all shapes); strides keep their alignment hints
@autotune(_GEMM_CONFIGS, _GEMM_CONFIGS[3], INTERP_CONFIG, key=["M", "N", "KR", "SPLIT", "GATE_A", "BIAS_GRAD"])
@triton.jit(do_not_specialize=["M", "N", "KR", "SPLIT"])
def _gemm_kernel(
    a_ptr,       # (M, KR) A, strides (stride_am, stride_ak)
    gate_ptr,    # (M, KR) ReLU output gating A, strides (stride_gm, stride_gk); read only when GATE_A
    b_ptr,       # (KR, N) B, strides (stride_bk, stride_bn)
    c_ptr,       # (SPLIT, M, N) result (partials when SPLIT > 1), strides (stride_cz, stride_cm, stride_cn)
    bias_ptr,    # (N) bias added in the epilogue; read only when HAS_BIAS
    rs_ptr,      # (SPLIT, M) row sums of gate(A), contiguous; written only when BIAS_GRAD
    M, N, KR,
    stride_am, stride_ak, stride_gm, stride_gk, stride_bk, stride_bn, stride_cz, stride_cm, stride_cn,
    SPLIT,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    GATE_A: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_rows = offs_m.to(tl.int64) * stride_am
    g_rows = offs_m.to(tl.int64) * stride_gm
    b_cols = offs_n.to(tl.int64) * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    rsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_iters = tl.cdiv(KR, BLOCK_K)
    per_split = tl.cdiv(n_iters, SPLIT)
    it0 = pid_z * per_split
    it1 = tl.minimum(it0 + per_split, n_iters)
    for it in range(it0, it1):
        offs_k = it * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < KR
        k64 = offs_k.to(tl.int64)
        a_mask = m_mask[:, None] & k_mask[None, :]
        a = tl.load(a_ptr + a_rows[:, None] + (k64 * stride_ak)[None, :], mask=a_mask, other=0.0)
        if GATE_A:
            g = tl.load(gate_ptr + g_rows[:, None] + (k64 * stride_gk)[None, :], mask=a_mask, other=0.0)
            a = tl.where(g <= 0, 0.0, a).to(a_ptr.dtype.element_ty)
        b = tl.load(b_ptr + (k64 * stride_bk)[:, None] + b_cols[None, :],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = mma(acc, a, b, FP32_IEEE, UPCAST)
        if BIAS_GRAD:
            rsum += tl.sum(a.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = relu_keep_nan(acc)
    c_off = (pid_z.to(tl.int64) * stride_cz + offs_m.to(tl.int64) * stride_cm)[:, None] + \
        (offs_n.to(tl.int64) * stride_cn)[None, :]
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    if BIAS_GRAD:
        tl.store(rs_ptr + pid_z.to(tl.int64) * M + offs_m, rsum.to(rs_ptr.dtype.element_ty),
                 mask=m_mask & (pid_n == 0))


def _gemm(a, b, c3, *, gate=None, bias=None, relu=False, row_sums=None, split=1):
    """c3[z] (M, N) = epilogue(gate(a)[:, chunk z] @ b[chunk z]); a (M, KR), b (KR, N), any strides.
    row_sums (split, M), when given, receives the row sums of gate(a) per chunk."""
    M, KR = a.shape
    N = b.shape[1]
    g = gate if gate is not None else a
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), split)  # noqa: E731
    _gemm_kernel[grid](
        a, g, b, c3, bias if bias is not None else b, row_sums if row_sums is not None else c3,
        M, N, KR,
        a.stride(0), a.stride(1), g.stride(0), g.stride(1), b.stride(0), b.stride(1),
        c3.stride(0), c3.stride(1), c3.stride(2),
        split,
        HAS_BIAS=bias is not None, RELU=relu, GATE_A=gate is not None, BIAS_GRAD=row_sums is not None,
        **dot_flags(a.dtype),
    )


def linear_relu_forward(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """input (M, I), weight (O, I), bias (O) or None -> relu(input @ weight.T + bias) (M, O)."""
    M, I = input.shape
    O = weight.shape[0]
    out = torch.empty((M, O), dtype=input.dtype, device=input.device)
    if out.numel() == 0:
        return out
    _gemm(input, weight.t(), out.unsqueeze(0), bias=bias.contiguous() if bias is not None else None, relu=True)
    return out


#: Batch rows per split of the weight gradient (see conv2d_relu_maxpool2d.WGRAD_SPLIT_CHUNK).
WGRAD_SPLIT_CHUNK = 32 if INTERPRET else 4096


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """A fresh empty [0] tensor per masked-off gradient: custom ops may not return aliased outputs."""
    return t.new_empty((0,))


def linear_relu_backward(
    grad_output: torch.Tensor,           # (M, O)
    input: torch.Tensor,                 # (M, I)
    weight: torch.Tensor,                # (O, I)
    output: torch.Tensor,                # (M, O) forward output: the ReLU gate
    output_mask,                         # [grad_input, grad_weight, grad_bias]
    split: int | None = None,            # weight-gradient reduction splits (None: heuristic); for tests
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_input (M, I), grad_weight (O, I), grad_bias (O)); masked-off entries are empty [0]."""
    M, I = input.shape
    O = weight.shape[0]
    dtype, dev = input.dtype, input.device
    g = grad_output.to(dtype)
    gate = output
    if gate.stride() != g.stride():   # the kernels read both with one set of strides in channel_sum
        g, gate = g.contiguous(), gate.contiguous()
    need_in, need_w, need_b = (bool(m) for m in output_mask)

    grad_input = _empty_like(input)
    if need_in:
        grad_input = torch.empty((M, I), dtype=dtype, device=dev)
        if O == 0:
            grad_input.zero_()
        elif grad_input.numel() > 0:
            _gemm(g, weight, grad_input.unsqueeze(0), gate=gate)

    grad_weight = _empty_like(input)
    grad_bias = _empty_like(input)
    fuse_bias = need_b and need_w
    if need_w:
        if M == 0 or O == 0 or I == 0:
            grad_weight = torch.zeros((O, I), dtype=dtype, device=dev)
            fuse_bias = False
        else:
            if split is None:
                tiles = triton.cdiv(O, 64) * triton.cdiv(I, 64)
                split = max(1, min(triton.cdiv(M, WGRAD_SPLIT_CHUNK), max(1, 512 // tiles), 64))
                if INTERPRET:
                    split = min(split, 4)
            split = max(1, min(split, triton.cdiv(M, 16)))
            acc_dtype = dtype if split == 1 else torch.float32
            gw = torch.empty((split, O, I), dtype=acc_dtype, device=dev)
            gb = torch.empty((split, O), dtype=acc_dtype, device=dev) if fuse_bias else None
            _gemm(g.t(), input, gw, gate=gate.t(), row_sums=gb, split=split)
            grad_weight = gw[0] if split == 1 else gw.sum(0).to(dtype)
            if fuse_bias:
                grad_bias = gb[0] if split == 1 else gb.sum(0).to(dtype)
    if need_b and not fuse_bias:
        grad_bias = torch.empty((O,), dtype=dtype, device=dev)
        channel_sum(g.unsqueeze(2), grad_bias, gate=gate.unsqueeze(2))
    return grad_input, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# the op's launchers (the contract's schemas) and compile jobs
# ---------------------------------------------------------------------------------------------


def validate(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """The forward's argument checks beyond the contract's fake: the kernels take 2-D input only."""
    contract.check_linear(input, weight, bias)
    if input.dim() != 2:
        raise ValueError(f"linear_relu: the op takes 2-D input (M, in_features), got shape {list(input.shape)}")


def forward(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """input (M, in_features), weight (out_features, in_features), bias (out_features) or None -> (M, out_features)."""
    validate(input, weight, bias)
    check_runnable(contract.NAME, input)
    with on_device(input):
        return linear_relu_forward(input, weight, bias)


def validate_backward(grad_output, input, weight, output, output_mask) -> None:
    """The backward's argument checks (its fake runs them too)."""
    contract.check_backward(grad_output, input, weight, output)


def backward(
    grad_output: torch.Tensor,           # (M, out_features)
    input: torch.Tensor,                 # (M, in_features)
    weight: torch.Tensor,                # (out_features, in_features)
    output: torch.Tensor,                # (M, out_features), the forward output (ReLU gate)
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_input (M, in), grad_weight (out, in), grad_bias (out)); masked-off entries are empty [0]."""
    validate_backward(grad_output, input, weight, output, output_mask)
    check_runnable(contract.CONTRACT.backward_name, input)
    with on_device(input):
        return linear_relu_backward(grad_output, input, weight, output, output_mask)


def aot_jobs(dtypes: list[str], all_configs: bool) -> Iterator[AotJob]:
    """Compile jobs of the GEMM kernel in each variant the launchers use."""
    for dt in dtypes:
        p = "*" + dt
        flags = aot_flags(dt)
        for c in aot_configs(_gemm_kernel, all_configs):
            # forward (bias+ReLU), forward without bias, grad_input (gated), grad_weight split / unsplit
            for has_bias, relu, gate, bias_grad, part in ((True, True, False, False, p), (False, True, False, False, p),
                                                          (False, False, True, False, p),
                                                          (False, False, True, True, "*fp32"),
                                                          (False, False, True, True, p)):
                ptrs = {"a_ptr": p, "gate_ptr": p, "b_ptr": p, "c_ptr": part, "bias_ptr": p, "rs_ptr": part}
                yield _gemm_kernel.fn, ptrs, dict(c, HAS_BIAS=has_bias, RELU=relu, GATE_A=gate,
                                                  BIAS_GRAD=bias_grad, **flags)

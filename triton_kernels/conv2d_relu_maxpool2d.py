"""Triton kernels for ``max_pool2d(relu(conv2d(x, w, b, stride, padding, dilation)), pool_kernel_size, pool_stride)``.

Forward (`conv2d_relu_maxpool2d_forward`): one implicit-GEMM kernel. A program owns a tile of pooled
outputs (rows: n, ph, pw) x output channels (columns: k). For each offset of the pool window (row-major)
it computes the conv value at that position as a GEMM over the reduction C*R*S, gathering the input
tile on the fly (no im2col buffer), adds the bias and folds it into a running max / argmax held in
registers. Only the pooled output and the one-byte argmax reach memory; the conv output never does.

Backward (`conv2d_relu_maxpool2d_backward`):
  1. route: grad_conv (N, K, P, Q) is gathered, not scattered: each conv position reads the (at most
     ceil(kh/sh) * ceil(kw/sw)) pooled outputs whose window covers it and adds their gradient where the
     argmax points back at it. No atomics, so it is deterministic and overlapping windows just work.
  2. grad_input (N, C, H, W): implicit GEMM over K*R*S from grad_conv and the weight (transposed conv).
  3. grad_weight (K, C, R, S): implicit GEMM over N*P*Q from grad_conv and the input, split along the
     reduction into float32 partials that are summed in a fixed order (deterministic); the bias gradient
     (sum of grad_conv over N, P, Q) is fused into it, or run alone when the weight gradient is not needed.

NaN and infinity: a padding tap is never multiplied (oneDNN's rule; stock's im2col convolution
multiplies it by zero), while every real (input, conv position, tap) triple is, a zero gradient
included, as in stock's dense backward. tl.dot multiplies whole tiles whose lanes that are no real
tap hold 0, so a non-finite weight (forward, grad_input) or conv-output gradient (grad_weight) puts
0 * inf = NaN there. Each kernel therefore checks its finished tile for NaN and only then redoes it
one reduction index at a time, multiplying real taps only: finite operands never leave the tl.dot
path, and nothing is synchronised with the host.

All kernels accumulate in float32 and take float32, float16 or bfloat16 tensors (contiguous NCHW).
Offsets that scale with the batch are int64, so tensors over 2**31 elements are addressed correctly.

`forward` / `backward` take the arguments of the contract's schemas (lightnet_ops/ops/conv2d_relu_maxpool2d.py)
and are what the ``triton`` backend registers; `aot_jobs` lists the kernels' compile jobs for ``aot_check``.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..ops import conv2d_relu_maxpool2d as contract
from ._common import (INTERP_CONFIG, INTERPRET, AotJob, aot_configs, aot_flags, any_nan, autotune, cfg, channel_sum,
                      check_runnable, dot_flags, mma, on_device, relu_keep_nan)

#: argmax byte where ReLU zeroed the pooled value (constexpr: jit code may read it as a global).
ARGMAX_RELU_ZERO = tl.constexpr(255)

# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

_FWD_CONFIGS = [
    cfg(BLOCK_M=64, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=3),
    cfg(BLOCK_M=128, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=3),
    cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3),
    cfg(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3),
    cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    cfg(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    cfg(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=2, num_stages=2),
]
# Problem sizes are not specialized on (divisibility by 16, == 1): one compile per dtype and config serves
# every shape, and the index math does not benefit from the hints.
_CONV_PARAMS = ["stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w"]
_FWD_SIZES = ["M", "C", "H", "W", "K", "R", "S", "P", "Q", "PH", "PW", "CRS", *_CONV_PARAMS,
              "pool_kh", "pool_kw", "pool_sh", "pool_sw"]
_BWD_SIZES = ["M", "C", "H", "W", "K", "R", "S", "P", "Q", "KRS", *_CONV_PARAMS]
_WGRAD_SIZES = ["C", "H", "W", "K", "R", "S", "P", "Q", "CRS", "NPQ", *_CONV_PARAMS, "SPLIT"]


@triton.jit
def _pooled_conv_tile(
    x_ptr, w_ptr, bias, m_mask, n_mask, x_base, w_rows, ph, pw,
    C, H, W, R, S, P, Q, CRS,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    pool_kh, pool_kw, pool_sh, pool_sw, pool_ph, pool_pw,
    out_dtype: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EXACT: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(max over the pool window of conv + bias, as float32; its window offset) for a tile of pooled
    positions (rows) x output channels (columns). The reduction runs through tl.dot, or with EXACT
    one index at a time multiplying real taps only (never a padding lane: 0 * inf would be NaN)."""
    RS = R * S
    best = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    n_k_iters = tl.cdiv(CRS, BLOCK_K)
    for win in range(0, pool_kh * pool_kw):
        # conv output position of this window offset (outside the conv output: pool padding), then
        # its input origin
        oh = ph * pool_sh - pool_ph + win // pool_kw
        ow = pw * pool_sw - pool_pw + win % pool_kw
        inside = (oh >= 0) & (oh < P) & (ow >= 0) & (ow < Q)
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if EXACT:
            for kk in range(0, CRS):
                c = kk // RS
                rs = kk % RS
                ih = ih0 + (rs // S) * dil_h
                iw = iw0 + (rs % S) * dil_w
                a_mask = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a = tl.load(x_ptr + x_base + c * (H * W) + ih * W + iw, mask=a_mask, other=0.0).to(tl.float32)
                b = tl.load(w_ptr + w_rows + kk, mask=n_mask, other=0.0).to(tl.float32)
                acc += tl.where(a_mask[:, None], a[:, None] * b[None, :], 0.0)
        else:
            for kt in range(0, n_k_iters):
                offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)   # reduction index (c, r, s)
                k_mask = offs_k < CRS
                c = offs_k // RS
                rs = offs_k % RS
                r = rs // S
                s = rs % S
                ih = ih0[:, None] + (r * dil_h)[None, :]
                iw = iw0[:, None] + (s * dil_w)[None, :]
                a_mask = m_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a_off = x_base[:, None] + (c * (H * W))[None, :] + ih * W + iw
                a = tl.load(x_ptr + a_off, mask=a_mask, other=0.0)
                b_off = w_rows[None, :] + offs_k[:, None]
                b = tl.load(w_ptr + b_off, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc = mma(acc, a, b, FP32_IEEE, UPCAST)
        if HAS_BIAS:
            acc += bias[None, :]
        # Compare values as stock would see them: the conv output rounded to the tensor dtype.
        v = acc.to(out_dtype).to(tl.float32)
        # first maximum wins ties; any NaN is taken (last NaN wins); pool padding is never taken
        take = inside[:, None] & ((v > best) | (v != v))
        best = tl.where(take, v, best)
        arg = tl.where(take, win, arg)
    return best, arg


@autotune(_FWD_CONFIGS, _FWD_CONFIGS[2], INTERP_CONFIG, key=["M", "K", "CRS", "pool_kh", "pool_kw"])
@triton.jit(do_not_specialize=_FWD_SIZES)
def _conv_fwd_kernel(
    x_ptr,       # (N, C, H, W) input, contiguous
    w_ptr,       # (K, C, R, S) weight, contiguous: row k is weight[k].flatten() (length CRS)
    b_ptr,       # (K) bias (read only when HAS_BIAS)
    out_ptr,     # (N, K, PH, PW) pooled output, written
    am_ptr,      # (N, K, PH, PW) uint8 argmax, written only when NEED_ARGMAX
    M, C, H, W, K, R, S, P, Q, PH, PW, CRS,  # M = N * PH * PW, CRS = C * R * S
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    pool_kh, pool_kw, pool_sh, pool_sw, pool_ph, pool_pw,   # pool window, stride, padding (as -inf)
    HAS_BIAS: tl.constexpr,
    NEED_ARGMAX: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # pooled positions (n, ph, pw)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # output channels k
    m_mask = offs_m < M
    n_mask = offs_n < K
    L = PH * PW
    n_img = offs_m // L
    rem = offs_m % L
    ph = rem // PW
    pw = rem % PW
    x_base = n_img.to(tl.int64) * C * H * W            # int64: the batch offset can pass 2**31
    w_rows = offs_n.to(tl.int64) * CRS
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out_off = (n_img.to(tl.int64) * K * L + rem)[:, None] + (offs_n * L)[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    best, arg = _pooled_conv_tile(
        x_ptr, w_ptr, bias, m_mask, n_mask, x_base, w_rows, ph, pw, C, H, W, R, S, P, Q, CRS,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, pool_kh, pool_kw, pool_sh, pool_sw, pool_ph, pool_pw,
        out_ptr.dtype.element_ty, HAS_BIAS, False, FP32_IEEE, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    # A NaN may be a padding lane's 0 times a non-finite weight: redo the tile multiplying real taps only
    # (finite operands never take this branch).
    if any_nan(best, o_mask):
        best, arg = _pooled_conv_tile(
            x_ptr, w_ptr, bias, m_mask, n_mask, x_base, w_rows, ph, pw, C, H, W, R, S, P, Q, CRS,
            stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, pool_kh, pool_kw, pool_sh, pool_sw, pool_ph, pool_pw,
            out_ptr.dtype.element_ty, HAS_BIAS, True, FP32_IEEE, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + out_off, relu_keep_nan(best).to(out_ptr.dtype.element_ty), mask=o_mask)
    if NEED_ARGMAX:
        code = tl.where(best <= 0, ARGMAX_RELU_ZERO, arg)   # no gradient where ReLU zeroed the max
        tl.store(am_ptr + out_off, code.to(tl.uint8), mask=o_mask)


def conv2d_relu_maxpool2d_forward(
    input: torch.Tensor,                 # (N, C, H, W)
    weight: torch.Tensor,                # (K, C, R, S)
    bias: torch.Tensor | None,           # (K) or None
    stride, padding, dilation, pool_kernel_size, pool_stride,   # pairs of ints
    P: int, Q: int, PH: int, PW: int,    # conv output and pooled output sizes (validated by the caller)
    need_argmax: bool,
    pool_padding=(0, 0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (N, K, PH, PW), argmax uint8 (N, K, PH, PW), or an empty uint8 tensor [0])."""
    x = input.contiguous()
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else None
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    out = torch.empty((N, K, PH, PW), dtype=x.dtype, device=x.device)
    argmax = torch.empty((N, K, PH, PW) if need_argmax else (0,), dtype=torch.uint8, device=x.device)
    M = N * PH * PW
    if out.numel() == 0:
        return out, argmax
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_N"]))  # noqa: E731
    _conv_fwd_kernel[grid](
        x, w, b if b is not None else w, out, argmax if need_argmax else out,
        M, C, H, W, K, R, S, P, Q, PH, PW, C * R * S,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        pool_kernel_size[0], pool_kernel_size[1], pool_stride[0], pool_stride[1], pool_padding[0], pool_padding[1],
        HAS_BIAS=b is not None, NEED_ARGMAX=need_argmax, **dot_flags(x.dtype),
    )
    return out, argmax


# ---------------------------------------------------------------------------------------------
# backward 1: route the pooled gradient through the argmax (gather)
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["total", "P", "Q", "PH", "PW", "pool_kh", "pool_kw", "pool_sh", "pool_sw",
                               "pool_ph", "pool_pw", "WIN_H", "WIN_W"])
def _route_kernel(
    go_ptr,      # (N, K, PH, PW) pooled gradient, contiguous
    am_ptr,      # (N, K, PH, PW) uint8 argmax, contiguous
    gc_ptr,      # (N, K, P, Q) conv-output gradient, written (every element)
    total, P, Q, PH, PW,
    pool_kh, pool_kw, pool_sh, pool_sw, pool_ph, pool_pw,
    WIN_H, WIN_W,   # most windows covering one position per dim: ceil(pool_kh / pool_sh), ceil(pool_kw / pool_sw)
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    q = offs % Q
    t = offs // Q
    p = t % P
    plane = (t // P) * (PH * PW)          # (n, k) plane start in the pooled tensors, int64
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    pp = p + pool_ph                       # position in the pool-padded plane
    qq = q + pool_pw
    for dh in range(0, WIN_H):
        ph = pp // pool_sh - dh            # windows starting at or before p, nearest first
        i = pp - ph * pool_sh              # row of p inside window ph
        ok_h = (ph >= 0) & (ph < PH) & (i < pool_kh)
        for dw in range(0, WIN_W):
            pw = qq // pool_sw - dw
            j = qq - pw * pool_sw
            ok = mask & ok_h & (pw >= 0) & (pw < PW) & (j < pool_kw)
            idx = plane + ph * PW + pw
            a = tl.load(am_ptr + idx, mask=ok, other=ARGMAX_RELU_ZERO).to(tl.int32)
            g = tl.load(go_ptr + idx, mask=ok, other=0.0).to(tl.float32)
            acc += tl.where(ok & (a == i * pool_kw + j), g, 0.0)
    tl.store(gc_ptr + offs, acc.to(gc_ptr.dtype.element_ty), mask=mask)


def route_pooled_grad(grad_output: torch.Tensor, argmax: torch.Tensor, P: int, Q: int,
                      pool_kernel_size, pool_stride, pool_padding=(0, 0)) -> torch.Tensor:
    """grad_output (N, K, PH, PW), argmax uint8 (N, K, PH, PW) -> grad_conv (N, K, P, Q), same dtype."""
    go = grad_output.contiguous()
    am = argmax.contiguous()
    N, K, PH, PW = go.shape
    gc = torch.empty((N, K, P, Q), dtype=go.dtype, device=go.device)
    total = gc.numel()
    if total == 0:
        return gc
    block = 256 if INTERPRET else 1024
    _route_kernel[(triton.cdiv(total, block),)](
        go, am, gc, total, P, Q, PH, PW,
        pool_kernel_size[0], pool_kernel_size[1], pool_stride[0], pool_stride[1], pool_padding[0], pool_padding[1],
        triton.cdiv(pool_kernel_size[0], pool_stride[0]), triton.cdiv(pool_kernel_size[1], pool_stride[1]),
        BLOCK=block,
    )
    return gc


# ---------------------------------------------------------------------------------------------
# backward 2: grad_input = conv_transpose(grad_conv, weight), implicit GEMM over K*R*S
# ---------------------------------------------------------------------------------------------

_BWD_CONFIGS = [
    cfg(BLOCK_M=64, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=3),
    cfg(BLOCK_M=128, BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=3),
    cfg(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3),
    cfg(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3),
    cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    cfg(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, num_warps=2, num_stages=2),
]


@autotune(_BWD_CONFIGS, _BWD_CONFIGS[2], INTERP_CONFIG, key=["M", "C", "KRS"])
@triton.jit(do_not_specialize=_BWD_SIZES)
def _conv_bwd_input_kernel(
    gc_ptr,      # (N, K, P, Q) conv-output gradient, contiguous
    w_ptr,       # (K, C, R, S) weight, contiguous
    gi_ptr,      # (N, C, H, W) input gradient, written
    M, C, H, W, K, R, S, P, Q, KRS,   # M = N * H * W, KRS = K * R * S
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    FP32_IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # input positions (n, h, w)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # input channels c
    m_mask = offs_m < M
    n_mask = offs_n < C
    HW = H * W
    PQ = P * Q
    RS = R * S
    n_img = offs_m // HW
    hw = offs_m % HW
    h = hw // W
    w = hw % W
    gc_base = n_img.to(tl.int64) * K * PQ
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kt in range(0, tl.cdiv(KRS, BLOCK_K)):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)   # reduction index (k, r, s)
        k_mask = offs_k < KRS
        k = offs_k // RS
        rs = offs_k % RS
        r = rs // S
        s = rs % S
        # input row h meets kernel row r at conv row p where p * stride_h = h + pad_h - r * dil_h
        hp = h[:, None] + pad_h - (r * dil_h)[None, :]
        wq = w[:, None] + pad_w - (s * dil_w)[None, :]
        ok = (hp >= 0) & (wq >= 0)
        hp = tl.where(ok, hp, 0)        # divide non-negative numbers only (C and Python round differently)
        wq = tl.where(ok, wq, 0)
        p = hp // stride_h
        q = wq // stride_w
        ok = ok & (p * stride_h == hp) & (q * stride_w == wq) & (p < P) & (q < Q)
        a_mask = ok & m_mask[:, None] & k_mask[None, :]
        a_off = gc_base[:, None] + (k * PQ)[None, :] + p * Q + q
        a = tl.load(gc_ptr + a_off, mask=a_mask, other=0.0)
        b_off = (k * (C * RS) + rs)[:, None] + (offs_n * RS)[None, :]
        b = tl.load(w_ptr + b_off, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = mma(acc, a, b, FP32_IEEE, UPCAST)
    o_mask = m_mask[:, None] & n_mask[None, :]
    # A NaN may be a lane that is no real (input, conv position, tap) triple, 0 times a non-finite
    # weight: redo the tile multiplying real triples only (finite operands never take this branch).
    if any_nan(acc, o_mask):
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kk in range(0, KRS):
            k = kk // RS
            rs = kk % RS
            hp = h + pad_h - (rs // S) * dil_h
            wq = w + pad_w - (rs % S) * dil_w
            ok = (hp >= 0) & (wq >= 0)
            hp = tl.where(ok, hp, 0)
            wq = tl.where(ok, wq, 0)
            p = hp // stride_h
            q = wq // stride_w
            ok = ok & (p * stride_h == hp) & (q * stride_w == wq) & (p < P) & (q < Q) & m_mask
            a = tl.load(gc_ptr + gc_base + k * PQ + p * Q + q, mask=ok, other=0.0).to(tl.float32)
            b = tl.load(w_ptr + k * (C * RS) + rs + offs_n * RS, mask=n_mask, other=0.0).to(tl.float32)
            acc += tl.where(ok[:, None], a[:, None] * b[None, :], 0.0)
    gi_off = (n_img.to(tl.int64) * C * HW + hw)[:, None] + (offs_n * HW)[None, :]
    tl.store(gi_ptr + gi_off, acc.to(gi_ptr.dtype.element_ty), mask=o_mask)


# ---------------------------------------------------------------------------------------------
# backward 3: grad_weight (+ fused grad_bias), implicit GEMM over N*P*Q, split along it
# ---------------------------------------------------------------------------------------------

_WGRAD_CONFIGS = [
    cfg(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    cfg(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
    cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    cfg(BLOCK_M=32, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=3),
    cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    cfg(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    cfg(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=2, num_stages=3),
]


@autotune(_WGRAD_CONFIGS, _WGRAD_CONFIGS[2], INTERP_CONFIG, key=["K", "CRS", "NPQ", "SPLIT"])
@triton.jit(do_not_specialize=_WGRAD_SIZES)
def _conv_bwd_weight_kernel(
    gc_ptr,      # (N, K, P, Q) conv-output gradient, contiguous
    x_ptr,       # (N, C, H, W) input, contiguous
    gw_ptr,      # (SPLIT, K, CRS) partial weight gradients (the (K, C, R, S) gradient itself when SPLIT == 1)
    gb_ptr,      # (SPLIT, K) partial bias gradients, written only when BIAS_GRAD
    C, H, W, K, R, S, P, Q, CRS, NPQ,   # CRS = C * R * S, NPQ = N * P * Q
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    SPLIT,
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
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # output channels k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # weight columns (c, r, s)
    m_mask = offs_m < K
    n_mask = offs_n < CRS
    RS = R * S
    PQ = P * Q
    c = offs_n // RS
    rs = offs_n % RS
    r = rs // S
    s = rs % S
    x_col = c * (H * W)
    dh = r * dil_h - pad_h
    dw = s * dil_w - pad_w
    k_row = offs_m.to(tl.int64) * PQ
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    bacc = tl.zeros([BLOCK_M], dtype=tl.float32)
    # this program's share of the reduction: iterations [it0, it1) of BLOCK_K each
    n_iters = tl.cdiv(NPQ, BLOCK_K)
    per_split = tl.cdiv(n_iters, SPLIT)
    it0 = pid_z * per_split
    it1 = tl.minimum(it0 + per_split, n_iters)
    for it in range(it0, it1):
        offs_k = it * BLOCK_K + tl.arange(0, BLOCK_K)   # reduction index (n, p, q)
        k_mask = offs_k < NPQ
        n_img = offs_k // PQ
        pq = offs_k % PQ
        p = pq // Q
        q = pq % Q
        a_off = (n_img.to(tl.int64) * K * PQ + pq)[None, :] + k_row[:, None]
        a = tl.load(gc_ptr + a_off, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        ih = (p * stride_h)[:, None] + dh[None, :]
        iw = (q * stride_w)[:, None] + dw[None, :]
        b_mask = k_mask[:, None] & n_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b_off = (n_img.to(tl.int64) * C * H * W)[:, None] + x_col[None, :] + ih * W + iw
        b = tl.load(x_ptr + b_off, mask=b_mask, other=0.0)
        acc = mma(acc, a, b, FP32_IEEE, UPCAST)
        if BIAS_GRAD:
            bacc += tl.sum(a.to(tl.float32), axis=1)
    o_mask = m_mask[:, None] & n_mask[None, :]
    # A NaN may be a padding lane's 0 times a non-finite conv-output gradient: redo this share of the
    # reduction multiplying real taps only (finite operands never take this branch).
    if any_nan(acc, o_mask):
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for j in range(it0 * BLOCK_K, tl.minimum(it1 * BLOCK_K, NPQ)):
            n_off = tl.cast(j // PQ, tl.int64)
            pq = j % PQ
            ih = (pq // Q) * stride_h + dh
            iw = (pq % Q) * stride_w + dw
            b_mask = n_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(gc_ptr + n_off * K * PQ + pq + k_row, mask=m_mask, other=0.0).to(tl.float32)
            b = tl.load(x_ptr + n_off * C * H * W + x_col + ih * W + iw, mask=b_mask, other=0.0).to(tl.float32)
            acc += tl.where(b_mask[None, :], a[:, None] * b[None, :], 0.0)
    z_off = pid_z.to(tl.int64) * K
    gw_off = ((z_off + offs_m) * CRS)[:, None] + offs_n[None, :]
    tl.store(gw_ptr + gw_off, acc.to(gw_ptr.dtype.element_ty), mask=o_mask)
    if BIAS_GRAD:
        tl.store(gb_ptr + z_off + offs_m, bacc.to(gb_ptr.dtype.element_ty), mask=m_mask & (pid_n == 0))


#: Reduction elements (N*P*Q) per split of the weight gradient: enough work per program to beat
#: the partials' traffic on a GPU; small under the interpreter so the tests exercise the split path.
WGRAD_SPLIT_CHUNK = 128 if INTERPRET else 4096
WGRAD_MAX_SPLIT = 64


def _wgrad_split(npq: int, tiles: int) -> int:
    if INTERPRET:
        return max(1, min(triton.cdiv(npq, WGRAD_SPLIT_CHUNK), 4))
    # enough programs to fill the GPU (~132 SMs x a few) when the (K, CRS) tile grid is small
    want = max(1, 512 // max(tiles, 1))
    return max(1, min(triton.cdiv(npq, WGRAD_SPLIT_CHUNK), want, WGRAD_MAX_SPLIT))


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """A fresh empty [0] tensor per masked-off gradient: custom ops may not return aliased outputs."""
    return t.new_empty((0,))


def conv2d_relu_maxpool2d_backward(
    grad_output: torch.Tensor,           # (N, K, PH, PW)
    input: torch.Tensor,                 # (N, C, H, W)
    weight: torch.Tensor,                # (K, C, R, S)
    argmax: torch.Tensor,                # uint8 (N, K, PH, PW)
    stride, padding, dilation, pool_kernel_size, pool_stride,
    P: int, Q: int,
    output_mask,                         # [grad_input, grad_weight, grad_bias]
    split: int | None = None,            # weight-gradient reduction splits (None: heuristic); for tests
    pool_padding=(0, 0),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_input (N, C, H, W), grad_weight (K, C, R, S), grad_bias (K)); masked-off
    entries are empty tensors of shape [0]."""
    x = input.contiguous()
    w = weight.contiguous()
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    dtype, dev = x.dtype, x.device
    need_in, need_w, need_b = (bool(m) for m in output_mask)
    gc = route_pooled_grad(grad_output.to(dtype), argmax, P, Q, pool_kernel_size, pool_stride, pool_padding)
    flags = dot_flags(dtype)
    conv_args = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])

    grad_input = _empty_like(input)
    if need_in:
        grad_input = torch.empty((N, C, H, W), dtype=dtype, device=dev)
        M, KRS = N * H * W, K * R * S
        if KRS == 0:
            grad_input.zero_()
        elif grad_input.numel() > 0:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(C, meta["BLOCK_N"]))  # noqa: E731
            _conv_bwd_input_kernel[grid](gc, w, grad_input, M, C, H, W, K, R, S, P, Q, KRS, *conv_args, **flags)

    grad_weight = _empty_like(input)
    grad_bias = _empty_like(input)
    if need_w:
        CRS, NPQ = C * R * S, N * P * Q
        fuse_bias = need_b
        if K == 0 or CRS == 0 or NPQ == 0:
            grad_weight = torch.zeros((K, C, R, S), dtype=dtype, device=dev)
            fuse_bias = False
        else:
            # tile count of the smallest config decides how many splits are worth it
            nsplit = split if split is not None else _wgrad_split(NPQ, triton.cdiv(K, 64) * triton.cdiv(CRS, 64))
            nsplit = max(1, min(nsplit, triton.cdiv(NPQ, 16)))
            if nsplit == 1:
                gw = torch.empty((1, K, CRS), dtype=dtype, device=dev)
                gb = torch.empty((1, K), dtype=dtype, device=dev) if fuse_bias else gw
            else:
                gw = torch.empty((nsplit, K, CRS), dtype=torch.float32, device=dev)
                gb = torch.empty((nsplit, K), dtype=torch.float32, device=dev) if fuse_bias else gw
            grid = lambda meta: (  # noqa: E731
                triton.cdiv(K, meta["BLOCK_M"]), triton.cdiv(CRS, meta["BLOCK_N"]), nsplit)
            _conv_bwd_weight_kernel[grid](
                gc, x, gw, gb, C, H, W, K, R, S, P, Q, CRS, NPQ, *conv_args, nsplit,
                BIAS_GRAD=fuse_bias, **flags,
            )
            # the partials are summed in a fixed order: deterministic
            grad_weight = (gw[0] if nsplit == 1 else gw.sum(0).to(dtype)).view(K, C, R, S)
            if fuse_bias:
                grad_bias = gb[0] if nsplit == 1 else gb.sum(0).to(dtype)
        if need_b and not fuse_bias:
            grad_bias = channel_sum(gc.view(N, K, P * Q), torch.empty((K,), dtype=dtype, device=dev))
    elif need_b:
        grad_bias = channel_sum(gc.view(N, K, P * Q), torch.empty((K,), dtype=dtype, device=dev))
    return grad_input, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------
# the op's launchers (the contract's schemas) and compile jobs
# ---------------------------------------------------------------------------------------------


def forward(
    input: torch.Tensor,                 # (N, C, H, W)
    weight: torch.Tensor,                # (K, C, R, S)
    bias: Optional[torch.Tensor],        # (K) or None
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    pool_kernel_size: Sequence[int],
    pool_stride: Sequence[int],
    need_argmax: bool,
    pool_padding: Sequence[int] = (0, 0),
    ceil_mode: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (N, K, PH, PW), argmax uint8 (N, K, PH, PW), or an empty uint8 [0] without need_argmax)."""
    s = contract.conv_pool_shape(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride,
                                 pool_padding, ceil_mode)
    check_runnable(contract.NAME, input)
    with on_device(input):
        return conv2d_relu_maxpool2d_forward(
            input, weight, bias, s.stride, s.padding, s.dilation, s.pool_kernel_size, s.pool_stride,
            s.P, s.Q, s.PH, s.PW, need_argmax, s.pool_padding,
        )


def validate_backward(grad_output, input, weight, argmax, stride, padding, dilation, pool_kernel_size, pool_stride,
                      output_mask, pool_padding=(0, 0), ceil_mode=False) -> contract.ConvPoolShape:
    """The backward's argument checks that the contract's fake does not run (its fake runs them too);
    returns the problem's sizes."""
    s = contract.conv_pool_shape(input, weight, None, stride, padding, dilation, pool_kernel_size, pool_stride,
                                 pool_padding, ceil_mode)
    contract.check_backward(s, grad_output, input, argmax)
    return s


def backward(
    grad_output: torch.Tensor,           # (N, K, PH, PW)
    input: torch.Tensor,                 # (N, C, H, W)
    weight: torch.Tensor,                # (K, C, R, S)
    argmax: torch.Tensor,                # uint8 (N, K, PH, PW)
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    pool_kernel_size: Sequence[int],
    pool_stride: Sequence[int],
    output_mask: Sequence[bool],
    pool_padding: Sequence[int] = (0, 0),
    ceil_mode: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_input (N, C, H, W), grad_weight (K, C, R, S), grad_bias (K)); masked-off entries are
    empty tensors of shape [0]."""
    s = validate_backward(grad_output, input, weight, argmax, stride, padding, dilation, pool_kernel_size,
                          pool_stride, output_mask, pool_padding, ceil_mode)
    check_runnable(contract.CONTRACT.backward_name, input)
    with on_device(input):
        return conv2d_relu_maxpool2d_backward(
            grad_output, input, weight, argmax, s.stride, s.padding, s.dilation, s.pool_kernel_size,
            s.pool_stride, s.P, s.Q, output_mask, pool_padding=s.pool_padding,
        )


def aot_jobs(dtypes: list[str], all_configs: bool) -> Iterator[AotJob]:
    """Compile jobs of every kernel above, in each variant the launchers use."""
    for dt in dtypes:
        p = "*" + dt
        flags = aot_flags(dt)
        for c in aot_configs(_conv_fwd_kernel, all_configs):
            for has_bias, need_argmax in ((True, True), (False, False)):
                ptrs = {"x_ptr": p, "w_ptr": p, "b_ptr": p, "out_ptr": p, "am_ptr": "*u8" if need_argmax else p}
                yield _conv_fwd_kernel.fn, ptrs, dict(c, HAS_BIAS=has_bias, NEED_ARGMAX=need_argmax, **flags)
        yield _route_kernel, {"go_ptr": p, "am_ptr": "*u8", "gc_ptr": p}, dict(BLOCK=1024, num_warps=4, num_stages=1)
        for c in aot_configs(_conv_bwd_input_kernel, all_configs):
            yield _conv_bwd_input_kernel.fn, {"gc_ptr": p, "w_ptr": p, "gi_ptr": p}, dict(c, **flags)
        for c in aot_configs(_conv_bwd_weight_kernel, all_configs):
            for part, bias_grad in (("*fp32", True), (p, True), ("*fp32", False)):
                ptrs = {"gc_ptr": p, "x_ptr": p, "gw_ptr": part, "gb_ptr": part}
                yield _conv_bwd_weight_kernel.fn, ptrs, dict(c, BIAS_GRAD=bias_grad, **flags)

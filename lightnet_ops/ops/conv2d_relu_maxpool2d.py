"""The fused conv op's contract: ``max_pool2d(relu(conv2d(input, weight, bias, stride, padding,
dilation)), pool_kernel_size, pool_stride)``, returning the output and a one-byte argmax per
output element (its offset inside the pool window, or ARGMAX_RELU_ZERO where ReLU zeroed it).

Schemas, the Python argument checker (the C++ one is in csrc/conv2d_relu_maxpool2d.cpp), the
output-size math, fakes, the pure-PyTorch reference forward / backward / tangent, and sample
arguments for the tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._contract import (AutogradSpec, OpContract, check_same, empty_placeholder, fail, grads_fake, relu_passes_grad,
                        sum_defined)

NAME = "conv2d_relu_maxpool2d"
# Returns (output (N, K, PH, PW), argmax uint8 (N, K, PH, PW), or an empty uint8 [0] when need_argmax is false).
# pool_padding / ceil_mode are max_pool2d's (padding as -inf; ceil-mode windows start inside the padded input).
SCHEMA = ("(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
          "int[2] pool_kernel_size, int[2] pool_stride, bool need_argmax, int[2] pool_padding=[0, 0], "
          "bool ceil_mode=False) -> (Tensor, Tensor)")
# Returns (grad_input, grad_weight, grad_bias); an entry whose output_mask is false is an empty [0] tensor.
BACKWARD_SCHEMA = ("(Tensor grad_output, Tensor input, Tensor weight, Tensor argmax, int[2] stride, int[2] padding, "
                   "int[2] dilation, int[2] pool_kernel_size, int[2] pool_stride, bool[3] output_mask, "
                   "int[2] pool_padding=[0, 0], bool ceil_mode=False) -> (Tensor, Tensor, Tensor)")

#: Argmax byte meaning "ReLU zeroed this pooled element": no gradient reaches the conv output.
ARGMAX_RELU_ZERO = 255
#: Largest pool window (kh * kw) whose offsets fit in one byte next to the sentinel.
MAX_POOL_WINDOW = 255


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pool_out_size(size: int, kernel: int, stride: int, padding: int = 0, ceil_mode: bool = False) -> int:
    """max_pool2d's output size (dilation 1): in ceil mode the last window must start inside the
    input or its left padding."""
    span = size + 2 * padding - kernel
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return out


@dataclass(frozen=True)
class ConvPoolShape:
    """Sizes of one problem: input (N, C, H, W), weight (K, C, R, S), conv output (P, Q),
    pooled output (PH, PW)."""

    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    pool_kernel_size: tuple[int, int]
    pool_stride: tuple[int, int]
    pool_padding: tuple[int, int]
    ceil_mode: bool
    P: int
    Q: int
    PH: int
    PW: int

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.K, self.PH, self.PW)


def conv_pool_shape(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    pool_kernel_size: Sequence[int],
    pool_stride: Sequence[int],
    pool_padding: Sequence[int] = (0, 0),
    ceil_mode: bool = False,
) -> ConvPoolShape:
    """Validates a 4-D problem and returns its sizes. Raises ValueError/TypeError naming the problem."""
    P, Q, PH, PW = check_conv_pool(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride,
                                   pool_padding, ceil_mode)
    N, C, H, W = input.shape
    K, _, R, S = weight.shape
    return ConvPoolShape(
        N, C, H, W, K, R, S, tuple(stride), tuple(padding), tuple(dilation),
        tuple(pool_kernel_size), tuple(pool_stride), tuple(pool_padding), bool(ceil_mode), P, Q, PH, PW,
    )


def check_conv_pool(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    pool_kernel_size: Sequence[int],
    pool_stride: Sequence[int],
    pool_padding: Sequence[int] = (0, 0),
    ceil_mode: bool = False,
) -> tuple[int, int, int, int]:
    """Validates a 4-D problem; returns (P, Q, PH, PW). Raises ValueError/TypeError naming the problem.
    (conv_pool_shape without building the dataclass: the functional API runs this on every call.)"""
    op = "conv2d_relu_maxpool2d"
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        fail(op, f"expected 4-D input (N, C, H, W), got {input.dim()}-D input of shape {tuple(input.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        fail(op, f"expected 4-D weight (out_channels, in_channels, kH, kW), got {got}")
    if not input.is_floating_point():
        raise TypeError(f"{op}: expected a floating-point input, got {input.dtype}")
    check_same(op, input, weight, "weight")
    if input.shape[1] != weight.shape[1]:
        fail(op, f"input has {input.shape[1]} channels but weight expects {weight.shape[1]} (groups=1 only)")
    if bias is not None:
        check_same(op, input, bias, "bias")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            fail(op, f"bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
    for name, v, low in (
        ("stride", stride, 1),
        ("padding", padding, 0),
        ("dilation", dilation, 1),
        ("pool_kernel_size", pool_kernel_size, 1),
        ("pool_stride", pool_stride, 1),
        ("pool_padding", pool_padding, 0),
    ):
        if len(v) != 2:
            fail(op, f"{name} must have 2 elements, got {list(v)}")
        if min(v) < low:
            fail(op, f"{name} must be {'positive' if low else 'non-negative'}, got {list(v)}")
    if pool_kernel_size[0] * pool_kernel_size[1] > MAX_POOL_WINDOW:
        fail(op, f"pool window {list(pool_kernel_size)} has more than {MAX_POOL_WINDOW} elements; the one-byte argmax cannot address it")
    N, C, H, W = input.shape
    K, _, R, S = weight.shape
    if R <= 0 or S <= 0:
        fail(op, f"kernel size must be positive, got {list(weight.shape)}")
    P = conv_out_size(H, R, stride[0], padding[0], dilation[0])
    Q = conv_out_size(W, S, stride[1], padding[1], dilation[1])
    if P <= 0 or Q <= 0:
        fail(
            op,
            f"input of spatial size ({H}, {W}) is too small for kernel ({R}, {S}) with padding "
            f"{list(padding)} and dilation {list(dilation)}",
        )
    if 2 * pool_padding[0] > pool_kernel_size[0] or 2 * pool_padding[1] > pool_kernel_size[1]:
        fail(op, f"pool_padding {list(pool_padding)} must be at most half of pool_kernel_size "
                 f"{list(pool_kernel_size)} (as max_pool2d)")
    PH = pool_out_size(P, pool_kernel_size[0], pool_stride[0], pool_padding[0], ceil_mode)
    PW = pool_out_size(Q, pool_kernel_size[1], pool_stride[1], pool_padding[1], ceil_mode)
    if PH <= 0 or PW <= 0:
        fail(op, f"pool window {tuple(pool_kernel_size)} is larger than the conv output ({P}, {Q})"
                 + (f" with pool_padding {list(pool_padding)}" if any(pool_padding) else ""))
    return P, Q, PH, PW


def check_backward(s: ConvPoolShape, grad_output: torch.Tensor, input: torch.Tensor, argmax: torch.Tensor) -> None:
    """The backward op's extra arguments agree with the problem `s`."""
    op = f"{NAME}_backward"
    if tuple(grad_output.shape) != s.out_shape:
        fail(op, f"grad_output has shape {list(grad_output.shape)}, expected {list(s.out_shape)}")
    if argmax.dtype != torch.uint8 or tuple(argmax.shape) != s.out_shape:
        fail(op, f"argmax must be uint8 of shape {list(s.out_shape)}, got {argmax.dtype} {list(argmax.shape)} "
                 "(was the forward run with need_argmax=True?)")
    if grad_output.dtype != input.dtype:
        fail(op, f"grad_output dtype {grad_output.dtype} does not match input dtype {input.dtype}")
    for name, t in (("grad_output", grad_output), ("argmax", argmax)):
        if t.device != input.device:
            fail(op, f"input is on {input.device} but {name} is on {t.device}")


# --- Fakes ------------------------------------------------------------------------------------

def fake(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, need_argmax,
         pool_padding=(0, 0), ceil_mode=False):
    s = conv_pool_shape(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, pool_padding,
                        ceil_mode)
    out = input.new_empty(s.out_shape)
    argmax = input.new_empty(s.out_shape, dtype=torch.uint8) if need_argmax else empty_placeholder(input, torch.uint8)
    return out, argmax


def backward_fake(grad_output, input, weight, argmax, stride, padding, dilation, pool_kernel_size, pool_stride,
                  output_mask, pool_padding=(0, 0), ceil_mode=False):
    return grads_fake(input, weight, output_mask)


# --- Reference (pure PyTorch) -------------------------------------------------------------------
# Written with differentiable stock ops: the backward (routing through the one-byte argmax, then
# aten.convolution_backward) is what autograd differentiates again for double backward.

def _window_origins(s: ConvPoolShape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv-output row (PH, 1) and column (1, PW) where each pool window starts (negative inside the
    pool padding): argmax offsets count from there."""
    oh = torch.arange(s.PH, device=device).view(-1, 1) * s.pool_stride[0] - s.pool_padding[0]
    ow = torch.arange(s.PW, device=device).view(1, -1) * s.pool_stride[1] - s.pool_padding[1]
    return oh, ow


def argmax_positions(argmax: torch.Tensor, s: ConvPoolShape) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat index into the conv-output plane (N, K, PH*PW), int64; live (N, K, PH*PW)): where each
    pooled element's argmax points, and whether ReLU kept it (flat is 0 where it did not)."""
    a = argmax.long()
    live = a != ARGMAX_RELU_ZERO
    oh, ow = _window_origins(s, a.device)
    flat = (oh + a // s.pool_kernel_size[1]) * s.Q + ow + a % s.pool_kernel_size[1]
    flat = torch.where(live, flat, torch.zeros_like(flat))
    return flat.reshape(s.N, s.K, s.PH * s.PW), live.reshape(s.N, s.K, s.PH * s.PW)


def reference(
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
    """Returns (output (N, K, PH, PW), argmax uint8 (N, K, PH, PW) or empty)."""
    s = conv_pool_shape(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, pool_padding,
                        ceil_mode)
    conv = F.conv2d(input, weight, bias, stride, padding, dilation)  # (N, K, P, Q)
    pre, flat_idx = F.max_pool2d(conv, pool_kernel_size, pool_stride, pool_padding, ceil_mode=ceil_mode,
                                 return_indices=True)
    out = F.relu(pre)
    if not need_argmax:
        return out, empty_placeholder(input, torch.uint8)
    # flat_idx indexes the (P, Q) plane; turn it into an offset inside the pool window.
    oh, ow = _window_origins(s, input.device)
    offset = (flat_idx // s.Q - oh) * pool_kernel_size[1] + flat_idx % s.Q - ow
    argmax = torch.where(relu_passes_grad(pre), offset, torch.full_like(offset, ARGMAX_RELU_ZERO))
    return out, argmax.to(torch.uint8)


def route_pooled_grad(
    grad_output: torch.Tensor, argmax: torch.Tensor, s: ConvPoolShape, dtype: torch.dtype
) -> torch.Tensor:
    """Scatters the pooled gradient (N, K, PH, PW) through the argmax into a dense conv-output
    gradient (N, K, P, Q). Overlapping windows accumulate."""
    flat, live = argmax_positions(argmax, s)
    src = grad_output.reshape(s.N, s.K, s.PH * s.PW)
    src = torch.where(live, src, torch.zeros_like(src)).to(dtype)
    # Out of place, so that vmap (per-sample gradients) can batch it.
    grad_conv = torch.zeros(s.N, s.K, s.P * s.Q, dtype=dtype, device=grad_output.device).scatter_add(2, flat, src)
    return grad_conv.view(s.N, s.K, s.P, s.Q)


def reference_backward(
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
    """Returns (grad_input, grad_weight, grad_bias); masked-off entries are empty tensors."""
    s = conv_pool_shape(input, weight, None, stride, padding, dilation, pool_kernel_size, pool_stride, pool_padding,
                        ceil_mode)
    check_backward(s, grad_output, input, argmax)
    grad_conv = route_pooled_grad(grad_output, argmax, s, input.dtype)
    grad_input, grad_weight, grad_bias = (empty_placeholder(input) for _ in range(3))
    if output_mask[0] or output_mask[1]:
        gi, gw, _ = torch.ops.aten.convolution_backward(
            grad_conv, input, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], 1,
            [bool(output_mask[0]), bool(output_mask[1]), False],
        )
        grad_input = gi if output_mask[0] else grad_input
        grad_weight = gw if output_mask[1] else grad_weight
    if output_mask[2]:
        grad_bias = grad_conv.sum(dim=(0, 2, 3))
    return grad_input, grad_weight, grad_bias


def reference_jvp(
    input: torch.Tensor,                 # (N, C, H, W), primal
    weight: torch.Tensor,                # (K, C, R, S), primal
    argmax: torch.Tensor,                # uint8 (N, K, PH, PW), from the forward
    t_input: Optional[torch.Tensor],     # tangents (None: zero)
    t_weight: Optional[torch.Tensor],
    t_bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    pool_kernel_size: Sequence[int],
    pool_stride: Sequence[int],
    pool_padding: Sequence[int] = (0, 0),
    ceil_mode: bool = False,
) -> torch.Tensor:
    """Tangent of the output (N, K, PH, PW): route(conv(t_input, w) + conv(x, t_weight) + t_bias)."""
    s = conv_pool_shape(input, weight, None, stride, padding, dilation, pool_kernel_size, pool_stride, pool_padding,
                        ceil_mode)
    t_conv = sum_defined(
        None if t_input is None else F.conv2d(t_input, weight, None, stride, padding, dilation),
        None if t_weight is None else F.conv2d(input, t_weight, None, stride, padding, dilation),
        None if t_bias is None else t_bias.view(1, -1, 1, 1).expand(s.N, s.K, s.P, s.Q),
    )
    if t_conv is None:
        return input.new_zeros(s.out_shape)
    flat, live = argmax_positions(argmax, s)
    picked = t_conv.reshape(s.N, s.K, s.P * s.Q).gather(2, flat)
    return torch.where(live, picked, torch.zeros_like(picked)).view(s.out_shape)


def sample_args(dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None) -> tuple:
    """input (2, 3, 9, 9), weight (4, 3, 3, 3), bias (4); stride 2, padding 1, and an overlapping pool
    (window 2, stride 1), so that gradients accumulate where windows share an element."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype, generator=generator)

    return randn(2, 3, 9, 9), randn(4, 3, 3, 3), randn(4), [2, 2], [1, 1], [1, 1], [2, 2], [1, 1], True


# apply(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, backend[, pool_padding,
# ceil_mode]) -> (output, argmax): the Function always asks for the argmax, and keeps it for backward.
AUTOGRAD = AutogradSpec("Conv2dReLUMaxPool2dFunction", backend_at=8, saved_inputs=(0, 1), saved_outputs=(1,),
                        forward_fixed=(True,))

CONTRACT = OpContract(NAME, SCHEMA, BACKWARD_SCHEMA, fake, backward_fake, reference, reference_backward, reference_jvp,
                      sample_args, AUTOGRAD)

"""The `reference` backend: both fused ops written as compositions of stock PyTorch ops, with the
same signatures and return conventions as the compiled ops (``torch.ops.lightnet_ops.*``).

It runs on every device and dtype, is the fallback when the extension is not built, and is the
oracle the kernels are tested against. Its backward functions are hand-written too (routing
through the one-byte argmax, then ``aten.convolution_backward``): nothing here relies on autograd.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._shapes import ARGMAX_RELU_ZERO, conv_pool_shape

_EMPTY_SHAPE = (0,)


def _relu_passes_grad(t: torch.Tensor) -> torch.Tensor:
    # threshold_backward passes the gradient where the output is not <= 0 (NaN included).
    return ~(t <= 0)


def conv2d_relu_maxpool2d(
    input: torch.Tensor,                 # (N, C, H, W)
    weight: torch.Tensor,                # (K, C, R, S)
    bias: Optional[torch.Tensor],        # (K) or None
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    pool_kernel_size: Sequence[int],
    pool_stride: Sequence[int],
    need_argmax: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (output (N, K, PH, PW), argmax uint8 (N, K, PH, PW) or empty)."""
    s = conv_pool_shape(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride)
    conv = F.conv2d(input, weight, bias, stride, padding, dilation)  # (N, K, P, Q)
    pre, flat_idx = F.max_pool2d(conv, pool_kernel_size, pool_stride, return_indices=True)
    out = F.relu(pre)
    if not need_argmax:
        return out, input.new_empty(_EMPTY_SHAPE, dtype=torch.uint8)
    # flat_idx indexes the (P, Q) plane; turn it into an offset inside the pool window.
    ph = torch.arange(s.PH, device=input.device).view(-1, 1) * pool_stride[0]
    pw = torch.arange(s.PW, device=input.device).view(1, -1) * pool_stride[1]
    dh = flat_idx // s.Q - ph
    dw = flat_idx % s.Q - pw
    offset = dh * pool_kernel_size[1] + dw
    argmax = torch.where(_relu_passes_grad(pre), offset, torch.full_like(offset, ARGMAX_RELU_ZERO))
    return out, argmax.to(torch.uint8)


def route_pooled_grad(
    grad_output: torch.Tensor, argmax: torch.Tensor, s, dtype: torch.dtype
) -> torch.Tensor:
    """Scatters the pooled gradient (N, K, PH, PW) through the argmax into a dense conv-output
    gradient (N, K, P, Q). Overlapping windows accumulate."""
    N, K = s.N, s.K
    a = argmax.long()
    live = a != ARGMAX_RELU_ZERO
    ph = torch.arange(s.PH, device=a.device).view(-1, 1) * s.pool_stride[0]
    pw = torch.arange(s.PW, device=a.device).view(1, -1) * s.pool_stride[1]
    h = ph + a // s.pool_kernel_size[1]
    w = pw + a % s.pool_kernel_size[1]
    flat = torch.where(live, h * s.Q + w, torch.zeros_like(a)).reshape(N, K, s.PH * s.PW)
    src = torch.where(live, grad_output, torch.zeros_like(grad_output)).to(dtype).reshape(N, K, s.PH * s.PW)
    # Out of place, so that vmap (per-sample gradients) can batch it.
    grad_conv = torch.zeros(N, K, s.P * s.Q, dtype=dtype, device=grad_output.device).scatter_add(2, flat, src)
    return grad_conv.view(N, K, s.P, s.Q)


def conv2d_relu_maxpool2d_backward(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_input, grad_weight, grad_bias); masked-off entries are empty tensors."""
    s = conv_pool_shape(input, weight, None, stride, padding, dilation, pool_kernel_size, pool_stride)
    if argmax.dtype != torch.uint8 or tuple(argmax.shape) != s.out_shape:
        raise ValueError(
            f"conv2d_relu_maxpool2d_backward: argmax must be uint8 of shape {list(s.out_shape)}, got "
            f"{argmax.dtype} {list(argmax.shape)} (was the forward run with need_argmax=True?)"
        )
    grad_conv = route_pooled_grad(grad_output, argmax, s, input.dtype)
    grad_input, grad_weight, grad_bias = (input.new_empty(_EMPTY_SHAPE) for _ in range(3))
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


def linear_relu(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """input (M, in_features) -> relu(input @ weight.T + bias) (M, out_features)."""
    return F.relu(F.linear(input, weight, bias))


def linear_relu_backward(
    grad_output: torch.Tensor,           # (M, out_features)
    input: torch.Tensor,                 # (M, in_features)
    weight: torch.Tensor,                # (out_features, in_features)
    output: torch.Tensor,                # (M, out_features), the forward's output
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gated = torch.where(_relu_passes_grad(output), grad_output, torch.zeros_like(grad_output))
    def empty():
        return input.new_empty(_EMPTY_SHAPE)

    return (
        gated @ weight if output_mask[0] else empty(),
        gated.t() @ input if output_mask[1] else empty(),
        gated.sum(0) if output_mask[2] else empty(),
    )


# --- Forward-mode AD (tangents) ---------------------------------------------------------------
# With the routing (argmax) fixed, the fused ops are linear in their inputs' perturbations: the
# tangent is the conv's (or the linear map's) tangent, routed through the argmax (or ReLU gate).


def _sum_defined(*terms: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    total = None
    for t in terms:
        if t is not None:
            total = t if total is None else total + t
    return total


def conv2d_relu_maxpool2d_jvp(
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
) -> torch.Tensor:
    """Tangent of the output (N, K, PH, PW): route(conv(t_input, w) + conv(x, t_weight) + t_bias)."""
    s = conv_pool_shape(input, weight, None, stride, padding, dilation, pool_kernel_size, pool_stride)
    t_conv = _sum_defined(
        None if t_input is None else F.conv2d(t_input, weight, None, stride, padding, dilation),
        None if t_weight is None else F.conv2d(input, t_weight, None, stride, padding, dilation),
        None if t_bias is None else t_bias.view(1, -1, 1, 1).expand(s.N, s.K, s.P, s.Q),
    )
    if t_conv is None:
        return input.new_zeros(s.out_shape)
    a = argmax.long()
    live = a != ARGMAX_RELU_ZERO
    ph = torch.arange(s.PH, device=a.device).view(-1, 1) * s.pool_stride[0]
    pw = torch.arange(s.PW, device=a.device).view(1, -1) * s.pool_stride[1]
    flat = torch.where(live, (ph + a // s.pool_kernel_size[1]) * s.Q + pw + a % s.pool_kernel_size[1], 0)
    picked = t_conv.reshape(s.N, s.K, s.P * s.Q).gather(2, flat.reshape(s.N, s.K, -1)).view(s.out_shape)
    return torch.where(live, picked, torch.zeros_like(picked))


def linear_relu_jvp(
    input: torch.Tensor,                 # (M, in_features), primal
    weight: torch.Tensor,                # (out_features, in_features), primal
    output: torch.Tensor,                # (M, out_features), the forward's output (the ReLU gate)
    t_input: Optional[torch.Tensor],
    t_weight: Optional[torch.Tensor],
    t_bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """Tangent of the output (M, out_features): relu-gated t_input @ W^T + x @ t_weight^T + t_bias."""
    t = _sum_defined(
        None if t_input is None else t_input @ weight.t(),
        None if t_weight is None else input @ t_weight.t(),
        None if t_bias is None else t_bias.expand_as(output),
    )
    if t is None:
        return torch.zeros_like(output)
    return torch.where(_relu_passes_grad(output), t, torch.zeros_like(t))

"""Functional API of the fused ops: argument normalisation, validation, unbatched input, backend
choice, and the choice between the autograd path (keeps a uint8 argmax) and the inference path
(writes only the output). The extension's ops (cpu, cuda) record their hand-written backward in
C++ (csrc/<op>.cpp); the other backends through the autograd.Functions in autograd.py."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import backend_registry as registry
from ._shapes import IntPair, pair
from .ops import conv2d_relu_maxpool2d as conv_op
from .ops import linear_relu as linear_op
from .autograd import forward_ad_active, function_for


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _autocast(input: torch.Tensor, *tensors: Optional[torch.Tensor]) -> tuple:
    """(input, *tensors) cast as autocast casts conv2d's / linear's arguments: under an enabled autocast
    for the input's device, every float tensor but float64 goes to the autocast dtype."""
    device = input.device.type
    if not torch.is_autocast_enabled(device):
        return (input, *tensors)
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in (input, *tensors))


def _same_padding(input: torch.Tensor, weight: torch.Tensor, stride: list[int],
                  dilation: list[int]) -> tuple[torch.Tensor, list[int]]:
    """padding='same' as F.conv2d does it: total padding dilation * (k - 1) per dimension, the odd
    element on the bottom/right (applied to the input explicitly, as the op pads symmetrically)."""
    if list(stride) != [1, 1]:
        raise ValueError("conv2d_relu_maxpool2d: padding='same' is not supported for strided convolutions")
    totals = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(2)]
    extra_h, extra_w = totals[0] % 2, totals[1] % 2
    if extra_h or extra_w:
        input = F.pad(input, (0, extra_w, 0, extra_h))
    return input, [totals[0] // 2, totals[1] // 2]


def _tangents_possible() -> bool:
    return forward_ad_active() or torch._C._are_functorch_transforms_active()


def _needs_function(impl: registry.Backend, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether the call must go through the Python autograd.Function: for a Python backend, to
    record backward, or, with a forward-mode AD level open, to reach its jvp rule (a bare kernel
    call would return an output without a tangent, which reads as zero). Under torch.func
    transforms every backend goes through it: C++ autograd Functions cannot run under them."""
    if torch._C._are_functorch_transforms_active():
        return True
    return not impl.records_autograd and (_needs_grad(*tensors) or forward_ad_active())


def conv2d_relu_maxpool2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    pool_kernel_size: IntPair = 2,
    pool_stride: Optional[IntPair] = None,
    pool_padding: IntPair = 0,
    ceil_mode: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.max_pool2d(F.relu(F.conv2d(input, weight, bias, stride, padding, dilation)), pool_kernel_size, pool_stride,
    pool_padding, ceil_mode=ceil_mode)`` in one op.

    Args:
        input: (N, C, H, W) or unbatched (C, H, W).
        weight: (K, C, R, S); groups=1.
        bias: (K) or None.
        stride, padding, dilation: conv parameters, int or pair (numpy / 0-d tensor ints too); padding may
            also be "valid" or "same" (stride 1), as in F.conv2d.
        pool_kernel_size: max-pool window, int or pair (at most 255 elements).
        pool_stride: max-pool stride; None means pool_kernel_size.
        pool_padding: max-pool padding (as -inf), int or pair, at most half the pool window.
        ceil_mode: max-pool ceil mode (windows that start inside the padded input count).
        backend: "auto", "cpu", "cuda", "triton" or "reference" (see lightnet_ops.backend_registry).

    Returns:
        (N, K, PH, PW), or (K, PH, PW) for unbatched input.
    """
    pool_k = pair(pool_kernel_size, "pool_kernel_size")
    return conv2d_relu_maxpool2d_normalized(
        input, weight, bias, pair(stride, "stride"), padding if isinstance(padding, str) else pair(padding, "padding"),
        pair(dilation, "dilation"), pool_k, pool_k if pool_stride is None else pair(pool_stride, "pool_stride"),
        pair(pool_padding, "pool_padding"), ceil_mode, backend,
    )


def conv2d_relu_maxpool2d_normalized(
    input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: list[int],
    padding: list[int] | str, dilation: list[int], pool_kernel_size: list[int], pool_stride: list[int],
    pool_padding: list[int], ceil_mode: bool, backend: str,
) -> torch.Tensor:
    """conv2d_relu_maxpool2d with its int parameters already pairs (sequences of two ints; padding may
    be "valid" or "same"), as the modules keep them: their per-call host path skips the normalisation."""
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"conv2d_relu_maxpool2d: ceil_mode must be a bool, got {ceil_mode!r}")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"conv2d_relu_maxpool2d: input must be a Tensor, got {type(input).__name__}")
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    elif input.dim() != 4:
        raise ValueError(
            f"conv2d_relu_maxpool2d: expected 3-D (C, H, W) or 4-D (N, C, H, W) input, got {input.dim()}-D input "
            f"of shape {tuple(input.shape)}"
        )
    if torch._C._is_any_autocast_enabled():
        input, weight, bias = _autocast(input, weight, bias)
    if isinstance(padding, str):  # F.conv2d's string forms
        if padding == "valid":
            padding = [0, 0]
        elif padding == "same" and isinstance(weight, torch.Tensor) and weight.dim() == 4:
            input, padding = _same_padding(input, weight, stride, dilation)
        elif padding != "same":
            raise ValueError(f"conv2d_relu_maxpool2d: invalid padding string {padding!r}, should be one of "
                             "{'valid', 'same'}")
    impl = registry.cached(backend, input)
    # The extension's ops check their own arguments in C++ (same exception types and messages,
    # csrc/<op>.cpp); Python checks only what they cannot see or never run.
    if impl is None or not impl.records_autograd or not _tensors_on(input.device, weight, bias) \
            or isinstance(padding, str):
        conv_op.check_conv_pool(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride,
                                pool_padding, ceil_mode)
        impl = registry.resolve(backend, input)
    if _needs_function(impl, input, weight, bias):
        out, _ = function_for(conv_op.NAME, _tangents_possible()).apply(
            input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, impl.name, pool_padding,
            ceil_mode
        )
    else:
        # need_argmax: whether backward may follow. A torch.jit.trace graph must not depend on the
        # grad mode it was traced in (its check re-traces under no_grad), so tracing always asks for it.
        need_argmax = _needs_grad(input, weight, bias) or torch.jit.is_tracing()
        out, _ = impl.kernels(conv_op.NAME).forward(input, weight, bias, stride, padding, dilation, pool_kernel_size,
                                                    pool_stride, need_argmax, pool_padding, ceil_mode)
    return out.squeeze(0) if unbatched else out


def _tensors_on(device: torch.device, weight, bias) -> bool:
    """weight and bias (or None) are tensors on `device`. The compiled ops cannot check devices
    themselves: the dispatcher picks the kernel from all arguments (a meta weight runs the fake)."""
    return isinstance(weight, torch.Tensor) and weight.device == device and (
        bias is None or (isinstance(bias, torch.Tensor) and bias.device == device))


def linear_relu(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.relu(F.linear(input, weight, bias))`` in one op.

    Args:
        input: (*, in_features).
        weight: (out_features, in_features).
        bias: (out_features) or None.
        backend: "auto", "cpu", "cuda", "triton" or "reference".

    Returns:
        (*, out_features).
    """
    if isinstance(input, torch.Tensor):
        if torch._C._is_any_autocast_enabled():
            input, weight, bias = _autocast(input, weight, bias)
        impl = registry.cached(backend, input)
        # The common case, checked by the extension's op itself (see conv2d_relu_maxpool2d_normalized).
        if impl is not None and impl.records_autograd and input.dim() == 2 and _tensors_on(input.device, weight, bias) \
                and (bias is None or bias.dim() != 0):
            return _linear_relu_2d(impl, input, weight, bias)
    if isinstance(bias, torch.Tensor) and bias.dim() == 0 and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        bias = bias.expand(weight.shape[0])  # F.linear broadcasts a 0-d bias
    linear_op.check_linear(input, weight, bias)
    impl = registry.resolve(backend, input)
    if input.dim() == 2:  # no reshapes (each would add a view node to the graph)
        return _linear_relu_2d(impl, input, weight, bias)
    lead = input.shape[:-1]
    x2d = input.reshape(math.prod(lead), input.shape[-1])  # explicit rows: in_features may be 0
    return _linear_relu_2d(impl, x2d, weight, bias).reshape(*lead, weight.shape[0])


def _linear_relu_2d(impl: registry.Backend, input: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    if _needs_function(impl, input, weight, bias):
        return function_for(linear_op.NAME, _tangents_possible()).apply(input, weight, bias, impl.name)
    return impl.kernels(linear_op.NAME).forward(input, weight, bias)

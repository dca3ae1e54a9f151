"""Public API of the fused conv op: ``conv2d_relu_maxpool2d`` (functional), ``Conv2dReLUMaxPool2d``
(nn.Module) and ``Conv2dReLUMaxPool2dFunction`` (its autograd.Function, built from the contract)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import backend_registry as registry
from .._shapes import IntPair, pair
from ..autograd import function_for
from ..ops import conv2d_relu_maxpool2d as conv_op
from ._common import _autocast, _needs_function, _needs_grad, _refuse_scripting, _reset_like_stock, \
    _tangents_possible, _tensors_on, _weight_and_bias

__all__ = ["conv2d_relu_maxpool2d", "conv2d_relu_maxpool2d_normalized", "Conv2dReLUMaxPool2d",
           "Conv2dReLUMaxPool2dFunction"]

#: ``apply(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, backend[, pool_padding,
#: ceil_mode])`` returns ``(output, argmax)``, both (N, K, PH, PW), like the raw op; every int argument is a pair.
#: (The argmax is an output, not hidden state, because torch.func transforms need every tensor that backward
#: uses to pass through ``setup_context``.)
Conv2dReLUMaxPool2dFunction: type[torch.autograd.Function] = function_for(conv_op.NAME, forward_ad=True)


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


class Conv2dReLUMaxPool2d(nn.Module):
    """Conv2d -> ReLU -> MaxPool2d as one fused op. Input (N, C, H, W) or (C, H, W).

    Parameters, their shapes and their default initialisation match nn.Conv2d exactly (same
    random-number consumption), so a seeded module gets stock's weights and state dicts load either way."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        bias: bool = True,
        pool_kernel_size: IntPair = 2,
        pool_stride: Optional[IntPair] = None,
        pool_padding: IntPair = 0,
        ceil_mode: bool = False,
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(pair(kernel_size, "kernel_size"))
        self.stride = tuple(pair(stride, "stride"))
        self.padding = tuple(pair(padding, "padding"))
        self.dilation = tuple(pair(dilation, "dilation"))
        self.pool_kernel_size = tuple(pair(pool_kernel_size, "pool_kernel_size"))
        self.pool_stride = self.pool_kernel_size if pool_stride is None else tuple(pair(pool_stride, "pool_stride"))
        self.pool_padding = tuple(pair(pool_padding, "pool_padding"))
        self.ceil_mode = bool(ceil_mode)
        self.backend = backend
        self.weight = nn.Parameter(torch.empty((out_channels, in_channels, *self.kernel_size), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_like_stock(self.weight, self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The parameters were normalised to pairs in __init__: skip the functional API's normalisation.
        weight, bias = _weight_and_bias(self, Conv2dReLUMaxPool2d)
        return conv2d_relu_maxpool2d_normalized(
            input, weight, bias, self.stride, self.padding, self.dilation,
            self.pool_kernel_size, self.pool_stride, self.pool_padding, self.ceil_mode, self.backend,
        )

    # torch.jit.script calls this on every submodule before compiling: fail with a clear message.
    __prepare_scriptable__ = _refuse_scripting

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        s += f", pool_kernel_size={self.pool_kernel_size}, pool_stride={self.pool_stride}"
        if self.pool_padding != (0, 0):
            s += f", pool_padding={self.pool_padding}"
        if self.ceil_mode:
            s += ", ceil_mode=True"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

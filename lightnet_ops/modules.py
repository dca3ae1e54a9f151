"""nn.Modules for the fused ops. Parameters, their shapes and their default initialisation match
nn.Conv2d / nn.Linear exactly (same random-number consumption), so a seeded fused module gets the
same weights as its stock twin and state dicts load either way."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import functional as LF
from ._shapes import IntPair, pair


def _reset_like_stock(weight: nn.Parameter, bias: Optional[nn.Parameter]) -> None:
    # Same calls, in the same order, as nn.Conv2d.reset_parameters / nn.Linear.reset_parameters.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
        if fan_in != 0:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(bias, -bound, bound)


def _refuse_scripting(module: nn.Module) -> nn.Module:
    raise RuntimeError(
        f"lightnet_ops.{type(module).__name__} cannot be compiled by torch.jit.script (the fused ops dispatch in "
        "Python); use torch.export.export or torch.compile (or torch.jit.trace) instead"
    )


class Conv2dReLUMaxPool2d(nn.Module):
    """Conv2d -> ReLU -> MaxPool2d as one fused op. Input (N, C, H, W) or (C, H, W)."""

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
        return LF.conv2d_relu_maxpool2d_normalized(
            input, self.weight, self.bias, self.stride, self.padding, self.dilation,
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


class LinearReLU(nn.Module):
    """Linear -> ReLU as one fused op. Input (*, in_features)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_like_stock(self.weight, self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return LF.linear_relu(input, self.weight, self.bias, backend=self.backend)

    # torch.jit.script calls this on every submodule before compiling: fail with a clear message.
    __prepare_scriptable__ = _refuse_scripting

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

"""The seed tutorial's LightNet, stock and fused.

Both have the same submodule names (conv1, conv2, fc1, fc2, fc3), parameter shapes and order, and
the same default initialisation, so state dicts load either way and seeded constructions match.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_state

from . import _ops
from . import backend_registry as registry
from .modules import Conv2dReLUMaxPool2d, LinearReLU


def _flat_features(input_size: int) -> int:
    side = ((input_size - 2) // 2 - 2) // 2  # conv3x3, pool2, conv3x3, pool2
    if side <= 0:
        raise ValueError(f"input_size={input_size} is too small for LightNet (needs at least 10)")
    return 16 * side * side


class StockLightNet(nn.Module):
    """The seed's LightNet in stock torch.nn: conv3x3(in->6)+ReLU+pool2, conv3x3(6->16)+ReLU+pool2,
    fc(->120)+ReLU, fc(120->84)+ReLU, fc(84->classes). Input (N, C, S, S) or (C, S, S)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 3)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(_flat_features(input_size), 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, -3)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LightNet(nn.Module):
    """Drop-in LightNet built from the fused ops; same parameters, names and init as StockLightNet."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 32, *,
                 backend: str = "auto") -> None:
        super().__init__()
        self.conv1 = Conv2dReLUMaxPool2d(in_channels, 6, 3, pool_kernel_size=2, backend=backend)
        self.conv2 = Conv2dReLUMaxPool2d(6, 16, 3, pool_kernel_size=2, backend=backend)
        self.fc1 = LinearReLU(_flat_features(input_size), 120, backend=backend)
        self.fc2 = LinearReLU(120, 84, backend=backend)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _LIGHTNET_FORWARD is not None and not torch.compiler.is_compiling():
            # _one_call_args' checks and the one call, in C++ (csrc/ops.cpp): they cost about a
            # fifth of the batch-1 forward in Python. None: a check did not pass there.
            out = _LIGHTNET_FORWARD(self, x)
            if out is not None:
                return out
        args = self._one_call_args(x)
        if args is not None:
            # The same ops in the same order, called from C++ (csrc/convnet.cpp): a small batch spends
            # most of its time in the Python between the layers.
            return _convnet_forward()(x, *args)
        x = self.conv2(self.conv1(x))
        x = torch.flatten(x, -3)
        return self.fc3(self.fc2(self.fc1(x)))

    def _one_call_args(self, x: torch.Tensor) -> Optional[tuple]:
        """convnet_forward's arguments after the input, or None where forward must run layer by layer.
        One call is taken for a batched plain CPU tensor, every submodule still the class __init__
        made with no hooks and its parameters on the input's device, the fused ones on the
        extension's cpu kernels (which record their own autograd), and nothing that must see the
        per-layer Python (autocast casts, torch function modes, torch.func transforms, tracing,
        TorchDynamo). Parameters are read from _parameters: Module.__getattr__ costs more per
        access than a small layer's kernel."""
        if type(x) is not torch.Tensor or not x.is_cpu or x.dim() != 4:
            return None
        if (torch._C._is_any_autocast_enabled() or torch._C._is_torch_function_mode_enabled()
                or torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state() is not None
                or torch.compiler.is_compiling()):
            return None
        if (_module_state._global_forward_pre_hooks or _module_state._global_forward_hooks
                or _module_state._global_backward_pre_hooks or _module_state._global_backward_hooks):
            return None
        modules = self._modules
        weights, biases = [], []
        checked_backend = None  # the fused layers' backend, once it is known to take this path
        for name, cls in _LIGHTNET_LAYERS:
            m = modules.get(name)
            if type(m) is not cls or m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks \
                    or m._backward_hooks:
                return None
            if cls is not nn.Linear and m.backend != checked_backend:
                if not registry.resolve(m.backend, x).records_autograd:
                    return None
                checked_backend = m.backend
            params = m._parameters
            weight, bias = params["weight"], params["bias"]
            # Plain parameters only (a subclass may define __torch_function__, which the one call
            # does not consult); x is a CPU tensor, so is_cpu is the cheap "on the input's device".
            if type(weight) not in _PLAIN or not weight.is_cpu or (
                    bias is not None and (type(bias) not in _PLAIN or not bias.is_cpu)):
                return None
            weights.append(weight)
            biases.append(bias)
        conv1, conv2 = modules["conv1"], modules["conv2"]
        if type(conv1.ceil_mode) is not bool or type(conv2.ceil_mode) is not bool:
            return None
        return weights[:2], biases[:2], _stage_params(conv1) + _stage_params(conv2), weights[2:], biases[2:]


_PLAIN = (nn.Parameter, torch.Tensor)


@functools.cache
def _convnet_forward():
    """The extension module's direct entry to convnet_forward (csrc/ops.cpp: the same kernel without
    torch.ops' boxed call), or the op where the module lacks it. Looked up once: forward calls it."""
    return _ops.direct_entry("convnet_forward") or torch.ops.lightnet_ops.convnet_forward


def _stage_params(conv: Conv2dReLUMaxPool2d) -> list[int]:
    """A conv stage's parameters as convnet_forward takes them (13 ints)."""
    return [*conv.stride, *conv.padding, *conv.dilation, *conv.pool_kernel_size, *conv.pool_stride, *conv.pool_padding,
            int(conv.ceil_mode)]


_LIGHTNET_LAYERS = (("conv1", Conv2dReLUMaxPool2d), ("conv2", Conv2dReLUMaxPool2d), ("fc1", LinearReLU),
                    ("fc2", LinearReLU), ("fc3", nn.Linear))


def _lightnet_forward_entry():
    """The extension module's lightnet_forward (csrc/ops.cpp), given the classes it checks against;
    None without the extension."""
    entry = _ops.direct_entry("lightnet_forward")
    if entry is not None:
        _ops.direct_entry("set_lightnet_classes")(Conv2dReLUMaxPool2d, LinearReLU, nn.Linear, _module_state)
    return entry


_LIGHTNET_FORWARD = _lightnet_forward_entry()

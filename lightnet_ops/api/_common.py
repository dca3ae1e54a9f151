"""What every op's public API shares: the per-call helpers of the functional API (autocast casting,
whether the call must go through the Python autograd.Function) and the modules' initialisation and
scripting refusal."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import backend_registry as registry
from ..autograd import forward_ad_active


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # a loop, not any(<generator>): this runs on every call
        if t is not None and t.requires_grad:
            return True
    return False


def _autocast(input: torch.Tensor, *tensors: Optional[torch.Tensor]) -> tuple:
    """(input, *tensors) cast as autocast casts conv2d's / linear's arguments: under an enabled autocast
    for the input's device, every float tensor but float64 goes to the autocast dtype."""
    device = input.device.type
    if not torch.is_autocast_enabled(device):
        return (input, *tensors)
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in (input, *tensors))


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


def _tensors_on(device: torch.device, weight, bias) -> bool:
    """weight and bias (or None) are tensors on `device`. The compiled ops cannot check devices
    themselves: the dispatcher picks the kernel from all arguments (a meta weight runs the fake)."""
    return isinstance(weight, torch.Tensor) and weight.device == device and (
        bias is None or (isinstance(bias, torch.Tensor) and bias.device == device))


def _weight_and_bias(module: nn.Module, cls: type) -> tuple:
    """(weight, bias) of a module, read from its _parameters when it is exactly `cls` with both
    registered there (Module.__getattr__ costs more per read than a tiny layer's kernel); otherwise
    (a subclass, a parametrization, weight_norm's computed attribute) through attribute access."""
    if type(module) is cls:
        params = module._parameters
        if "weight" in params and "bias" in params:
            return params["weight"], params["bias"]
    return module.weight, module.bias


def _add_weight_and_bias(module: nn.Module, weight_shape: tuple, bias: bool, factory: dict) -> None:
    """Registers `weight` (uninitialised, weight_shape) and `bias` (weight_shape[0], or None) in the order
    nn.Conv2d / nn.Linear do, so parameter lists and state dicts match stock's."""
    module.weight = nn.Parameter(torch.empty(weight_shape, **factory))
    if bias:
        module.bias = nn.Parameter(torch.empty(weight_shape[0], **factory))
    else:
        module.register_parameter("bias", None)


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

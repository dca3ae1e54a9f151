"""autograd.Functions for the fused ops, for the Python backends (triton, reference).

Forward calls the backend's forward op; first-order backward calls its hand-written backward op
(never autograd through stock ops). Under ``create_graph=True`` backward switches to the reference
backward, made of differentiable stock ops routed by the same argmax, so second derivatives are
exact; ``jvp`` routes tangents the same way (forward-mode AD). The Functions use the
``setup_context`` form, so ``torch.func.grad``/``vjp``/``jacrev``/``jvp`` work through them.

The extension's backends (cpu, cuda) record the same contract in C++ (csrc/<op>.cpp, through autograd_op.h), which
skips Python in backward; these classes still accept them. The backend is passed as an
already-resolved name (see registry.resolve)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.autograd.forward_ad as forward_ad

from . import backend_registry as registry
from .ops import conv2d_relu_maxpool2d as conv_op
from .ops import linear_relu as linear_op


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (torch.autograd.forward_ad.dual_level, torch.func.jvp)."""
    return forward_ad._current_level >= 0


def _creates_graph(*backward_inputs: Optional[torch.Tensor]) -> bool:
    """Backward under create_graph=True whose results depend on something that requires grad: it
    must record its own graph for a second derivative."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in backward_inputs)


def _masked(grads, mask) -> tuple:
    return tuple(g if need else None for g, need in zip(grads, mask))


class Conv2dReLUMaxPool2dFunction(torch.autograd.Function):
    """max_pool2d(relu(conv2d(input, weight, bias))) keeping only a uint8 argmax for backward.

    ``apply(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, backend[, pool_padding,
    ceil_mode])``
    returns ``(output, argmax)``, both (N, K, PH, PW), like the raw op; every int argument is a pair.
    (The argmax is an output, not hidden state, because torch.func transforms need every tensor that
    backward uses to pass through ``setup_context``.)"""

    # vmap (e.g. per-sample gradients, vmap(grad(f))) runs forward/backward/jvp on batched tensors.
    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, backend,
                pool_padding=(0, 0), ceil_mode=False):
        # input (N, C, H, W), weight (K, C, R, S), bias (K) or None -> (output, argmax uint8), (N, K, PH, PW)
        return registry.get(backend).kernels(conv_op.NAME).forward(
            input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, True, pool_padding, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, backend, *pool = inputs
        _, argmax = output
        ctx.mark_non_differentiable(argmax)
        ctx.save_for_backward(input, weight, argmax)
        if forward_ad_active():
            ctx.save_for_forward(input, weight, argmax)
        ctx.params = (stride, padding, dilation, pool_kernel_size, pool_stride)
        ctx.pool = tuple(pool) or ((0, 0), False)  # (pool_padding, ceil_mode)
        ctx.has_bias = bias is not None
        ctx.backend = backend
        # An output that receives no gradient arrives as None (as in stock PyTorch's nodes) instead
        # of a zero tensor to route through the whole backward.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output: Optional[torch.Tensor], _grad_argmax: Any = None):
        if grad_output is None:
            return (None,) * 11
        input, weight, argmax = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias]
        if _creates_graph(grad_output, input, weight):
            # create_graph=True: the reference backward is made of differentiable stock ops routed by
            # the same argmax, so autograd records it and second derivatives are exact.
            grads = conv_op.reference_backward(grad_output, input, weight, argmax, *ctx.params, mask, *ctx.pool)
        else:
            with torch.no_grad():
                grads = registry.get(ctx.backend).kernels(conv_op.NAME).backward(
                    grad_output, input, weight, argmax, *ctx.params, mask, *ctx.pool)
        return _masked(grads, mask) + (None,) * 8

    @staticmethod
    def jvp(ctx, t_input, t_weight, t_bias, *_):
        """Forward-mode AD: the conv's tangent routed through the forward's argmax."""
        input, weight, argmax = ctx.saved_tensors
        t_out = conv_op.reference_jvp(input, weight, argmax, t_input, t_weight, t_bias, *ctx.params, *ctx.pool)
        return t_out, None


class LinearReLUFunction(torch.autograd.Function):
    """relu(linear(input, weight, bias)) for 2-D input; saves the output as the ReLU gate.

    ``apply(input, weight, bias, backend)`` returns the output (M, out_features)."""

    generate_vmap_rule = True  # see Conv2dReLUMaxPool2dFunction

    @staticmethod
    def forward(input, weight, bias, backend):
        # input (M, in_features), weight (out_features, in_features), bias (out_features) or None
        return registry.get(backend).kernels(linear_op.NAME).forward(input, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        input, weight, bias, backend = inputs
        ctx.save_for_backward(input, weight, output)
        if forward_ad_active():
            ctx.save_for_forward(input, weight, output)
        ctx.has_bias = bias is not None
        ctx.backend = backend
        ctx.set_materialize_grads(False)  # see Conv2dReLUMaxPool2dFunction

    @staticmethod
    def backward(ctx, grad_output: Optional[torch.Tensor]):
        if grad_output is None:
            return (None,) * 4
        input, weight, out = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias]
        if _creates_graph(grad_output, input, weight):  # see Conv2dReLUMaxPool2dFunction.backward
            grads = linear_op.reference_backward(grad_output, input, weight, out, mask)
        else:
            with torch.no_grad():
                grads = registry.get(ctx.backend).kernels(linear_op.NAME).backward(grad_output, input, weight, out, mask)
        return _masked(grads, mask) + (None,)

    @staticmethod
    def jvp(ctx, t_input, t_weight, t_bias, _):
        """Forward-mode AD: the linear map's tangent, gated by the ReLU."""
        input, weight, out = ctx.saved_tensors
        return linear_op.reference_jvp(input, weight, out, t_input, t_weight, t_bias)


# TorchDynamo refuses to trace autograd.Functions that define a custom jvp. Outside forward-mode AD
# the functional API records these twins instead: the same Functions with Function's default jvp,
# under the same class names (so graph nodes read "Conv2dReLUMaxPool2dFunctionBackward" either way).
_Conv2dReLUMaxPool2dReverseOnly = type("Conv2dReLUMaxPool2dFunction", (Conv2dReLUMaxPool2dFunction,),
                                       {"jvp": torch.autograd.Function.jvp, "__module__": __name__})
_LinearReLUReverseOnly = type("LinearReLUFunction", (LinearReLUFunction,),
                              {"jvp": torch.autograd.Function.jvp, "__module__": __name__})


def conv_function(forward_ad: bool) -> type[Conv2dReLUMaxPool2dFunction]:
    """The Function to record: with the jvp rule when forward-mode AD (or a torch.func transform) is active."""
    return Conv2dReLUMaxPool2dFunction if forward_ad else _Conv2dReLUMaxPool2dReverseOnly


def linear_function(forward_ad: bool) -> type[LinearReLUFunction]:
    return LinearReLUFunction if forward_ad else _LinearReLUReverseOnly

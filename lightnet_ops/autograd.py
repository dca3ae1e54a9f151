"""autograd.Functions for the fused ops. Forward calls the backend's forward op; backward calls
its hand-written backward op (never autograd through stock ops). The backend is passed as an
already-resolved name (see registry.resolve).

The functional API uses these for the Triton and reference backends. The extension's backends
(cpu, cuda) record the same backward through C++ twins of these classes (csrc/autograd.cpp),
which skip Python in backward; these classes still accept them."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.autograd.forward_ad as forward_ad

from . import backend_registry as registry


def _grad_or_none(t: torch.Tensor, needed: bool) -> Optional[torch.Tensor]:
    return t if needed else None


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (torch.autograd.forward_ad.dual_level, torch.func.jvp)."""
    return forward_ad._current_level >= 0


def _second_order_message(op: str) -> str:
    return (f"lightnet_ops.{op}: second derivatives (double backward through create_graph=True) are not supported "
            "yet; use the stock torch.nn.functional ops for higher-order gradients")


def _forward_ad_message(op: str) -> str:
    return (f"lightnet_ops.{op}: forward-mode AD (torch.func.jvp / torch.autograd.forward_ad) is not supported yet; "
            "use the stock torch.nn.functional ops")


class _SecondOrderUnsupported(torch.autograd.Function):
    """Identity on the first-order gradients whose own backward raises. Its graph edges lead to the
    backward's real inputs (grad_output, input, weight), so a second derivative along any path
    reaches it. (@once_differentiable links its error node to detached copies of the results
    instead: a second derivative taken with respect to the weight never meets it and silently drops
    a term.)"""

    @staticmethod
    def forward(ctx, message: str, n_grads: int, *tensors: torch.Tensor):
        ctx.message = message
        return tuple(t.clone() for t in tensors[:n_grads])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def _first_order_only(op: str, grads: tuple, inputs: tuple) -> tuple:
    """`grads` (the backward's results, None where not needed) unchanged, unless backward runs with
    create_graph=True on inputs that require grad: then they carry a node that raises on a second
    derivative."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in inputs):
        return grads
    present = [i for i, g in enumerate(grads) if g is not None]
    linked = _SecondOrderUnsupported.apply(_second_order_message(op), len(present),
                                           *[grads[i] for i in present], *[t for t in inputs if t is not None])
    out = list(grads)
    for i, g in zip(present, linked):
        out[i] = g
    return tuple(out)


class Conv2dReLUMaxPool2dFunction(torch.autograd.Function):
    """max_pool2d(relu(conv2d(input, weight, bias))) keeping only a uint8 argmax for backward."""

    @staticmethod
    def forward(
        ctx,
        input: torch.Tensor,             # (N, C, H, W)
        weight: torch.Tensor,            # (K, C, R, S)
        bias: Optional[torch.Tensor],    # (K) or None
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        pool_kernel_size: Sequence[int],
        pool_stride: Sequence[int],
        backend: str,
    ) -> torch.Tensor:                   # (N, K, PH, PW)
        impl = registry.get(backend)
        out, argmax = impl.conv_forward(input, weight, bias, stride, padding, dilation, pool_kernel_size,
                                        pool_stride, True)
        ctx.save_for_backward(input, weight, argmax)
        ctx.params = (stride, padding, dilation, pool_kernel_size, pool_stride)
        ctx.has_bias = bias is not None
        ctx.backend = backend
        # An output that receives no gradient arrives as None (as in stock PyTorch's nodes) instead
        # of a zero tensor to route through the whole backward.
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_output: Optional[torch.Tensor]):
        if grad_output is None:
            return (None,) * 9
        input, weight, argmax = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and ctx.has_bias
        impl = registry.get(ctx.backend)
        with torch.no_grad():
            grad_input, grad_weight, grad_bias = impl.conv_backward(
                grad_output, input, weight, argmax, *ctx.params, [need_input, need_weight, need_bias]
            )
        grads = (
            _grad_or_none(grad_input, need_input),
            _grad_or_none(grad_weight, need_weight),
            _grad_or_none(grad_bias, need_bias),
        )
        return _first_order_only("conv2d_relu_maxpool2d", grads, (grad_output, input, weight)) + (None,) * 6

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(_forward_ad_message("conv2d_relu_maxpool2d"))


class LinearReLUFunction(torch.autograd.Function):
    """relu(linear(input, weight, bias)) for 2-D input; saves the output as the ReLU gate."""

    @staticmethod
    def forward(
        ctx,
        input: torch.Tensor,             # (M, in_features)
        weight: torch.Tensor,            # (out_features, in_features)
        bias: Optional[torch.Tensor],    # (out_features) or None
        backend: str,
    ) -> torch.Tensor:                   # (M, out_features)
        impl = registry.get(backend)
        out = impl.linear_forward(input, weight, bias)
        ctx.save_for_backward(input, weight, out)
        ctx.has_bias = bias is not None
        ctx.backend = backend
        ctx.set_materialize_grads(False)  # see Conv2dReLUMaxPool2dFunction
        return out

    @staticmethod
    def backward(ctx, grad_output: Optional[torch.Tensor]):
        if grad_output is None:
            return (None,) * 4
        input, weight, out = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and ctx.has_bias
        impl = registry.get(ctx.backend)
        with torch.no_grad():
            grad_input, grad_weight, grad_bias = impl.linear_backward(
                grad_output, input, weight, out, [need_input, need_weight, need_bias]
            )
        grads = (
            _grad_or_none(grad_input, need_input),
            _grad_or_none(grad_weight, need_weight),
            _grad_or_none(grad_bias, need_bias),
        )
        return _first_order_only("linear_relu", grads, (grad_output, input, weight)) + (None,)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(_forward_ad_message("linear_relu"))

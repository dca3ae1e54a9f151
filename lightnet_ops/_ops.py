"""Loads the compiled extension (``lightnet_ops._C``), which registers the op schemas
(csrc/ops.cpp) and the CPU/CUDA kernels, and registers the fake (meta) implementations that let
``torch.compile`` and ``torch.library.opcheck`` reason about shapes without running kernels.

Importing this module never fails: without a built extension ``EXTENSION_AVAILABLE`` is False and
``EXTENSION_ERROR`` says why.
"""

from __future__ import annotations

import torch

from ._shapes import conv_pool_shape

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the repository (or `make test`, "
    "which also creates the virtual environment)"
)

try:
    from . import _C  # noqa: F401  (loading the library runs TORCH_LIBRARY registrations)

    EXTENSION_AVAILABLE = True
    EXTENSION_ERROR: str | None = None
except ImportError as e:  # not built, or built against another torch
    EXTENSION_AVAILABLE = False
    EXTENSION_ERROR = f"{type(e).__name__}: {e}"

OP_NAMES = (
    "conv2d_relu_maxpool2d",
    "conv2d_relu_maxpool2d_backward",
    "linear_relu",
    "linear_relu_backward",
)


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether the built extension registered a `dispatch_key` ("CPU", "CUDA") kernel for the op."""
    if not EXTENSION_AVAILABLE:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lightnet_ops::{op_name}", dispatch_key)


def empty_placeholder(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The [0]-shaped tensor the ops return for an output that was not asked for."""
    return like.new_empty((0,), dtype=dtype or like.dtype)


# Fake (meta) implementations, shared by the compiled ops below and the Triton ops
# (lightnet_ops/_triton_ops.py), which have the same schemas.


def conv2d_relu_maxpool2d_fake(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride,
                               need_argmax):
    s = conv_pool_shape(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride)
    out = input.new_empty(s.out_shape)
    argmax = input.new_empty(s.out_shape, dtype=torch.uint8) if need_argmax else empty_placeholder(input, torch.uint8)
    return out, argmax


def conv2d_relu_maxpool2d_backward_fake(grad_output, input, weight, argmax, stride, padding, dilation,
                                        pool_kernel_size, pool_stride, output_mask):
    return _grads_fake(input, weight, output_mask)


def linear_relu_fake(input, weight, bias):
    return input.new_empty((input.shape[0], weight.shape[0]))


def linear_relu_backward_fake(grad_output, input, weight, output, output_mask):
    return _grads_fake(input, weight, output_mask)


def _grads_fake(input, weight, output_mask):
    """(grad_input, grad_weight, grad_bias), contiguous, or placeholders where not asked for."""
    return (
        input.new_empty(input.shape) if output_mask[0] else empty_placeholder(input),
        input.new_empty(weight.shape) if output_mask[1] else empty_placeholder(input),
        input.new_empty((weight.shape[0],)) if output_mask[2] else empty_placeholder(input),
    )


if EXTENSION_AVAILABLE:
    torch.library.register_fake("lightnet_ops::conv2d_relu_maxpool2d")(conv2d_relu_maxpool2d_fake)
    torch.library.register_fake("lightnet_ops::conv2d_relu_maxpool2d_backward")(conv2d_relu_maxpool2d_backward_fake)
    torch.library.register_fake("lightnet_ops::linear_relu")(linear_relu_fake)
    torch.library.register_fake("lightnet_ops::linear_relu_backward")(linear_relu_backward_fake)

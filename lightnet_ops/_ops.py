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


def _empty(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return like.new_empty((0,), dtype=dtype or like.dtype)


if EXTENSION_AVAILABLE:

    @torch.library.register_fake("lightnet_ops::conv2d_relu_maxpool2d")
    def _conv2d_relu_maxpool2d_fake(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride,
                                    need_argmax):
        s = conv_pool_shape(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride)
        out = input.new_empty(s.out_shape)
        argmax = input.new_empty(s.out_shape, dtype=torch.uint8) if need_argmax else _empty(input, torch.uint8)
        return out, argmax

    @torch.library.register_fake("lightnet_ops::conv2d_relu_maxpool2d_backward")
    def _conv2d_relu_maxpool2d_backward_fake(grad_output, input, weight, argmax, stride, padding, dilation,
                                             pool_kernel_size, pool_stride, output_mask):
        return (
            torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else _empty(input),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] else _empty(input),
            input.new_empty((weight.shape[0],)) if output_mask[2] else _empty(input),
        )

    @torch.library.register_fake("lightnet_ops::linear_relu")
    def _linear_relu_fake(input, weight, bias):
        return input.new_empty((input.shape[0], weight.shape[0]))

    @torch.library.register_fake("lightnet_ops::linear_relu_backward")
    def _linear_relu_backward_fake(grad_output, input, weight, output, output_mask):
        return (
            input.new_empty(input.shape) if output_mask[0] else _empty(input),
            weight.new_empty(weight.shape) if output_mask[1] else _empty(input),
            weight.new_empty((weight.shape[0],)) if output_mask[2] else _empty(input),
        )

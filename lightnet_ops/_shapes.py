"""Argument normalisation shared by the functional API, the modules and lo.fuse. Each op's own
checks and size math live in its contract (lightnet_ops/ops/<op>.py); they are re-exported here
for the callers that import them from this module. The compiled ops' C++ copy of the checks, with
the same exception types and messages, is in each op's csrc/<op>.cpp."""

from __future__ import annotations

import operator
from typing import Optional, Sequence, Union

import torch

IntPair = Union[int, Sequence[int]]


def pair(value: IntPair, name: str) -> list[int]:
    """`3` -> `[3, 3]`; `(2, 3)` -> `[2, 3]`; anything else raises a TypeError/ValueError naming `name`."""
    # Fast paths for the common forms: this runs several times per functional call.
    if type(value) is int:
        return [value, value]
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return list(value)
    scalar = _as_int(value)
    if scalar is not None:
        return [scalar, scalar]
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dim() == 0):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(items) == 1:
        items = items * 2
    ints = [_as_int(v) for v in items]
    if len(ints) != 2 or any(v is None for v in ints):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return ints


def _as_int(value) -> Optional[int]:
    """A Python int for integer-likes that stock accepts (int, numpy integer, 0-d integer tensor); None
    for anything else (bools included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        return int(value) if value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool \
            and not value.is_complex() else None
    try:
        return operator.index(value)
    except TypeError:
        return None


from .ops.conv2d_relu_maxpool2d import (  # noqa: E402,F401  (re-exported)
    ARGMAX_RELU_ZERO,
    MAX_POOL_WINDOW,
    ConvPoolShape,
    check_conv_pool,
    conv_out_size,
    conv_pool_shape,
    pool_out_size,
)
from .ops.linear_relu import check_linear  # noqa: E402,F401  (re-exported)

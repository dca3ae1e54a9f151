"""Argument normalisation, validation and output-size math shared by every backend, the fake
(meta) kernels and the functional API. Mirrors csrc/include/lightnet_ops/conv_params.h."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

IntPair = Union[int, Sequence[int]]

#: Argmax byte meaning "ReLU zeroed this pooled element": no gradient reaches the conv output.
ARGMAX_RELU_ZERO = 255
#: Largest pool window (kh * kw) whose offsets fit in one byte next to the sentinel.
MAX_POOL_WINDOW = 255


def pair(value: IntPair, name: str) -> list[int]:
    """`3` -> `[3, 3]`; `(2, 3)` -> `[2, 3]`; anything else raises a TypeError/ValueError naming `name`."""
    # Fast path (every call from the modules passes a pair of ints): this runs on every forward.
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return list(value)
    if _as_int(value) is not None:
        return [_as_int(value)] * 2
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


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pool_out_size(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


@dataclass(frozen=True)
class ConvPoolShape:
    """Sizes of one problem: input (N, C, H, W), weight (K, C, R, S), conv output (P, Q),
    pooled output (PH, PW)."""

    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    pool_kernel_size: tuple[int, int]
    pool_stride: tuple[int, int]
    P: int
    Q: int
    PH: int
    PW: int

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.K, self.PH, self.PW)


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"{op}: {msg}")


def check_same(op: str, input: torch.Tensor, other: torch.Tensor, name: str) -> None:
    if not isinstance(other, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(other).__name__}")
    if other.dtype != input.dtype:
        _fail(op, f"input dtype {input.dtype} does not match {name} dtype {other.dtype}")
    if other.device != input.device:
        _fail(op, f"input is on {input.device} but {name} is on {other.device}")


def conv_pool_shape(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    pool_kernel_size: Sequence[int],
    pool_stride: Sequence[int],
) -> ConvPoolShape:
    """Validates a 4-D problem and returns its sizes. Raises ValueError/TypeError naming the problem."""
    P, Q, PH, PW = check_conv_pool(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride)
    N, C, H, W = input.shape
    K, _, R, S = weight.shape
    return ConvPoolShape(
        N, C, H, W, K, R, S, tuple(stride), tuple(padding), tuple(dilation),
        tuple(pool_kernel_size), tuple(pool_stride), P, Q, PH, PW,
    )


def check_conv_pool(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    pool_kernel_size: Sequence[int],
    pool_stride: Sequence[int],
) -> tuple[int, int, int, int]:
    """Validates a 4-D problem; returns (P, Q, PH, PW). Raises ValueError/TypeError naming the problem.
    (conv_pool_shape without building the dataclass: the functional API runs this on every call.)"""
    op = "conv2d_relu_maxpool2d"
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        _fail(op, f"expected 4-D input (N, C, H, W), got {input.dim()}-D input of shape {tuple(input.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        _fail(op, f"expected 4-D weight (out_channels, in_channels, kH, kW), got {got}")
    if not input.is_floating_point():
        raise TypeError(f"{op}: expected a floating-point input, got {input.dtype}")
    check_same(op, input, weight, "weight")
    if input.shape[1] != weight.shape[1]:
        _fail(op, f"input has {input.shape[1]} channels but weight expects {weight.shape[1]} (groups=1 only)")
    if bias is not None:
        check_same(op, input, bias, "bias")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            _fail(op, f"bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
    for name, v, low in (
        ("stride", stride, 1),
        ("padding", padding, 0),
        ("dilation", dilation, 1),
        ("pool_kernel_size", pool_kernel_size, 1),
        ("pool_stride", pool_stride, 1),
    ):
        if len(v) != 2:
            _fail(op, f"{name} must have 2 elements, got {list(v)}")
        if min(v) < low:
            _fail(op, f"{name} must be {'positive' if low else 'non-negative'}, got {list(v)}")
    if pool_kernel_size[0] * pool_kernel_size[1] > MAX_POOL_WINDOW:
        _fail(op, f"pool window {list(pool_kernel_size)} has more than {MAX_POOL_WINDOW} elements; the one-byte argmax cannot address it")
    N, C, H, W = input.shape
    K, _, R, S = weight.shape
    if R <= 0 or S <= 0:
        _fail(op, f"kernel size must be positive, got {list(weight.shape)}")
    P = conv_out_size(H, R, stride[0], padding[0], dilation[0])
    Q = conv_out_size(W, S, stride[1], padding[1], dilation[1])
    if P <= 0 or Q <= 0:
        _fail(
            op,
            f"input of spatial size ({H}, {W}) is too small for kernel ({R}, {S}) with padding "
            f"{list(padding)} and dilation {list(dilation)}",
        )
    if pool_kernel_size[0] > P or pool_kernel_size[1] > Q:
        _fail(op, f"pool window {tuple(pool_kernel_size)} is larger than the conv output ({P}, {Q})")
    PH = pool_out_size(P, pool_kernel_size[0], pool_stride[0])
    PW = pool_out_size(Q, pool_kernel_size[1], pool_stride[1])
    return P, Q, PH, PW


def check_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Validates linear_relu arguments for input (*, in_features)."""
    op = "linear_relu"
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 1:
        _fail(op, "input must have at least 1 dimension (*, in_features), got a 0-D tensor")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        _fail(op, f"expected 2-D weight (out_features, in_features), got {got}")
    if not input.is_floating_point():
        raise TypeError(f"{op}: expected a floating-point input, got {input.dtype}")
    check_same(op, input, weight, "weight")
    if input.shape[-1] != weight.shape[1]:
        _fail(op, f"input has {input.shape[-1]} features but weight expects {weight.shape[1]}")
    if bias is not None:
        check_same(op, input, bias, "bias")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            _fail(op, f"bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")

"""The fused linear op's contract: ``relu(linear(input, weight, bias))`` for 2-D input (M, in_features);
the backward takes the forward's output as the ReLU gate.

Schemas, the Python argument checker (the C++ one is in csrc/linear_relu.cpp), fakes, the
pure-PyTorch reference forward / backward / tangent, and sample arguments for the tests."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._contract import (AutogradSpec, OpContract, check_same, empty_placeholder, fail, grads_fake, relu_passes_grad,
                        sum_defined)

NAME = "linear_relu"
# input (M, in_features) -> output (M, out_features).
SCHEMA = "(Tensor input, Tensor weight, Tensor? bias) -> Tensor"
# `output` is the forward's output (the ReLU gate). Returns (grad_input, grad_weight, grad_bias); an
# entry whose output_mask is false is an empty [0] tensor.
BACKWARD_SCHEMA = ("(Tensor grad_output, Tensor input, Tensor weight, Tensor output, bool[3] output_mask) "
                   "-> (Tensor, Tensor, Tensor)")


def check_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Validates linear_relu arguments for input (*, in_features)."""
    op = "linear_relu"
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 1:
        fail(op, "input must have at least 1 dimension (*, in_features), got a 0-D tensor")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        fail(op, f"expected 2-D weight (out_features, in_features), got {got}")
    if not input.is_floating_point():
        raise TypeError(f"{op}: expected a floating-point input, got {input.dtype}")
    check_same(op, input, weight, "weight")
    if input.shape[-1] != weight.shape[1]:
        fail(op, f"input has {input.shape[-1]} features but weight expects {weight.shape[1]}")
    if bias is not None:
        check_same(op, input, bias, "bias")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            fail(op, f"bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")


def check_backward(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, output: torch.Tensor) -> None:
    """The backward op's arguments: 2-D input and matching grad_output / output."""
    op = "linear_relu_backward"
    if input.dim() != 2:
        fail(op, f"expected 2-D input (M, in_features), got shape {list(input.shape)}")
    check_linear(input, weight, None)
    want = (input.shape[0], weight.shape[0])
    for name, t in (("grad_output", grad_output), ("output", output)):
        if tuple(t.shape) != want:
            fail(op, f"{name} has shape {list(t.shape)}, expected {list(want)}")
        if t.dtype != input.dtype:
            fail(op, f"{name} dtype {t.dtype} does not match input dtype {input.dtype}")
        if t.device != input.device:
            fail(op, f"input is on {input.device} but {name} is on {t.device}")


# --- Fakes ------------------------------------------------------------------------------------

def fake(input, weight, bias):
    return input.new_empty((input.shape[0], weight.shape[0]))


def backward_fake(grad_output, input, weight, output, output_mask):
    return grads_fake(input, weight, output_mask)


# --- Reference (pure PyTorch, differentiable: double backward uses it) --------------------------

def reference(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """input (M, in_features) -> relu(input @ weight.T + bias) (M, out_features)."""
    return F.relu(F.linear(input, weight, bias))


def reference_backward(
    grad_output: torch.Tensor,           # (M, out_features)
    input: torch.Tensor,                 # (M, in_features)
    weight: torch.Tensor,                # (out_features, in_features)
    output: torch.Tensor,                # (M, out_features), the forward's output
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gated = torch.where(relu_passes_grad(output), grad_output, torch.zeros_like(grad_output))
    def empty():
        return empty_placeholder(input)

    return (
        gated @ weight if output_mask[0] else empty(),
        gated.t() @ input if output_mask[1] else empty(),
        gated.sum(0) if output_mask[2] else empty(),
    )


def reference_jvp(
    input: torch.Tensor,                 # (M, in_features), primal
    weight: torch.Tensor,                # (out_features, in_features), primal
    output: torch.Tensor,                # (M, out_features), the forward's output (the ReLU gate)
    t_input: Optional[torch.Tensor],
    t_weight: Optional[torch.Tensor],
    t_bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """Tangent of the output (M, out_features): relu-gated t_input @ W^T + x @ t_weight^T + t_bias."""
    t = sum_defined(
        None if t_input is None else t_input @ weight.t(),
        None if t_weight is None else input @ t_weight.t(),
        None if t_bias is None else t_bias.expand_as(output),
    )
    if t is None:
        return torch.zeros_like(output)
    return torch.where(relu_passes_grad(output), t, torch.zeros_like(t))


def sample_args(dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None) -> tuple:
    """input (5, 7), weight (3, 7), bias (3)."""
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype, generator=generator)

    return randn(5, 7), randn(3, 7), randn(3)


# apply(input, weight, bias, backend) -> output; the output is the ReLU gate backward needs.
AUTOGRAD = AutogradSpec("LinearReLUFunction", backend_at=3, saved_inputs=(0, 1), saved_outputs=(0,))

CONTRACT = OpContract(NAME, SCHEMA, BACKWARD_SCHEMA, fake, backward_fake, reference, reference_backward, reference_jvp,
                      sample_args, AUTOGRAD)

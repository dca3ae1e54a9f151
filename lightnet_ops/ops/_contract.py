"""What every op module provides, and the helpers they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class AutogradSpec:
    """How the op's Python autograd.Function (built by lightnet_ops/autograd.py, used by the Python
    backends and under torch.func) is called and what it keeps; the rest follows from the schemas.

    ``apply`` takes the forward schema's arguments with ``backend`` (a resolved backend name) at
    index ``backend_at``, in place of the ``len(forward_fixed)`` arguments there, which the Function
    passes to the forward op as ``forward_fixed``. The leading tensors, one per backward output, are
    the differentiable inputs; the other arguments but ``backend`` are the non-tensor ``params``. The
    first forward output carries the gradient; further outputs are non-differentiable. Backward calls
    the backward op (``reference_backward`` under ``create_graph=True``) as ``(grad_output, *saved,
    *params before backend, output_mask, *params after it)``: the backward schema must read so (the
    factory checks the names); ``reference_jvp`` is called as ``(*saved, *input tangents, *params)``."""

    function_name: str                # the class name; graph nodes read "<function_name>Backward"
    backend_at: int                   # index of `backend` among apply's arguments
    saved_inputs: tuple[int, ...]     # apply's arguments kept for backward and jvp, in this order...
    saved_outputs: tuple[int, ...]    # ...then these forward outputs (an argmax, a ReLU gate)
    forward_fixed: tuple = ()         # forward-op arguments apply does not take (conv: need_argmax=True)


@dataclass(frozen=True)
class OpContract:
    """One fused op. Schemas are written without the op name, as ``torch.library.custom_op`` takes
    them; the extension declares ``lightnet_ops::<name>`` and ``lightnet_ops::<name>_backward`` with
    the same text (csrc/<name>.cpp; tests/test_contracts.py checks they agree) and the Triton backend
    registers ``lightnet_ops::triton_<name>[_backward]`` from these strings."""

    name: str
    schema: str                      # forward: "(Tensor input, ...) -> ..."
    backward_schema: str             # backward: "(Tensor grad_output, ...) -> (Tensor, Tensor, Tensor)"
    fake: Callable                   # forward's fake (meta) kernel, same arguments as the schema
    backward_fake: Callable
    reference: Callable              # pure-PyTorch forward, same arguments and returns as the schema
    reference_backward: Callable     # pure-PyTorch backward, differentiable (double backward uses it)
    reference_jvp: Callable          # tangent of the output (forward-mode AD)
    # sample_args(dtype, generator) -> the forward's arguments for a small problem, the inputs the
    # op-independent tests (tests/test_contracts.py, tests/test_autograd_modes.py) run every op on.
    sample_args: Callable[[torch.dtype, Optional[torch.Generator]], tuple]
    autograd: AutogradSpec           # the Python autograd.Function's calling convention

    @property
    def backward_name(self) -> str:
        return f"{self.name}_backward"


def fail(op: str, msg: str) -> None:
    raise ValueError(f"{op}: {msg}")


def check_same(op: str, input: torch.Tensor, other: torch.Tensor, name: str) -> None:
    """`other` is a tensor with input's dtype and device."""
    if not isinstance(other, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(other).__name__}")
    if other.dtype != input.dtype:
        fail(op, f"input dtype {input.dtype} does not match {name} dtype {other.dtype}")
    if other.device != input.device:
        fail(op, f"input is on {input.device} but {name} is on {other.device}")


def empty_placeholder(like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The [0]-shaped tensor the ops return for an output that was not asked for."""
    return like.new_empty((0,), dtype=dtype or like.dtype)


def grads_fake(input: torch.Tensor, weight: torch.Tensor, output_mask) -> tuple:
    """(grad_input, grad_weight, grad_bias) of a backward op, or placeholders where not asked for."""
    return (
        input.new_empty(input.shape) if output_mask[0] else empty_placeholder(input),
        input.new_empty(weight.shape) if output_mask[1] else empty_placeholder(input),
        input.new_empty((weight.shape[0],)) if output_mask[2] else empty_placeholder(input),
    )


def relu_passes_grad(t: torch.Tensor) -> torch.Tensor:
    """Where ReLU's output passes a gradient: not <= 0, NaN included (as threshold_backward)."""
    return ~(t <= 0)


def sum_defined(*terms: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The sum of the terms that are not None (None if all are)."""
    total = None
    for t in terms:
        if t is not None:
            total = t if total is None else total + t
    return total

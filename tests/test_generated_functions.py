"""Every contract's generated Python autograd.Function (``autograd.function_for``), on the ``reference``
backend with the contract's float64 sample arguments: its outputs and every input gradient against the
contract's ``reference`` differentiated by torch.autograd, and ``gradcheck`` of ``apply``. Contracts are
iterated, so a new op is covered without an edit here."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from lightnet_ops.autograd import function_for
from lightnet_ops.ops import CONTRACTS, OpContract

NAMES = sorted(CONTRACTS)
TOL = {"rtol": 1e-9, "atol": 1e-9}  # float64, the project's tolerance


def _n_grads(c: OpContract) -> int:
    """How many leading forward arguments are differentiable: one per backward output."""
    return len(torch._C.parse_schema(f"lightnet_ops::b{c.backward_schema}").returns)


def _sample(c: OpContract) -> tuple[list[torch.Tensor], list]:
    """(the differentiable float64 inputs, the forward op's other arguments)."""
    args = list(c.sample_args(torch.float64, torch.Generator().manual_seed(0)))
    n = _n_grads(c)
    return args[:n], args[n:]


def _apply_args(c: OpContract, inputs: list, rest: list) -> tuple:
    """apply's arguments: the forward op's, with "reference" at ``backend_at`` in place of the ones the
    Function fixes (which the sample arguments must pass as the Function does)."""
    spec = c.autograd
    args = [*inputs, *rest]
    at, fixed = spec.backend_at, len(spec.forward_fixed)
    assert tuple(args[at:at + fixed]) == spec.forward_fixed, "sample_args must pass the Function's fixed arguments"
    return (*args[:at], "reference", *args[at + fixed:])


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _check_against(c: OpContract, function: type[torch.autograd.Function], reference: Callable) -> None:
    """Assert that `function` (on the reference backend) gives `reference`'s outputs and, for a seeded
    grad_output on the first output, the input gradients torch.autograd computes through `reference`."""
    inputs, rest = _sample(c)
    mine = [t.detach().clone().requires_grad_() for t in inputs]
    theirs = [t.detach().clone().requires_grad_() for t in inputs]
    got = _as_tuple(function.apply(*_apply_args(c, mine, rest)))
    want = _as_tuple(reference(*theirs, *rest))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"output {i}"
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, i=i: f"output {i}: {m}")
    grad_output = torch.randn(want[0].shape, dtype=want[0].dtype, generator=torch.Generator().manual_seed(1))
    got_grads = torch.autograd.grad(got[0], mine, grad_output)
    want_grads = torch.autograd.grad(want[0], theirs, grad_output)
    for i, (g, w) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert w.abs().max() > 0, f"the sample gives input {i} no gradient: the comparison would be empty"
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, i=i: f"gradient of input {i}: {m}")


@pytest.mark.parametrize("forward_ad", [False, True], ids=["reverse_only", "with_jvp"])
@pytest.mark.parametrize("name", NAMES)
def test_function_matches_the_reference(name, forward_ad):
    c = CONTRACTS[name]
    _check_against(c, function_for(name, forward_ad), c.reference)


@pytest.mark.parametrize("name", NAMES)
def test_function_passes_gradcheck(name):
    c = CONTRACTS[name]
    function = function_for(name, forward_ad=True)
    inputs, rest = _sample(c)
    leaves = tuple(t.detach().clone().requires_grad_() for t in inputs)

    def first_output(*tensors: torch.Tensor) -> torch.Tensor:
        return _as_tuple(function.apply(*_apply_args(c, list(tensors), rest)))[0]

    assert torch.autograd.gradcheck(first_output, leaves, check_forward_ad=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("wrong", ["output", "gradient"])
def test_the_comparison_catches_a_wrong_reference(name, wrong):
    # A reference off by 1e-6 in its value, or (same value) in its gradient, must fail the check above.
    c = CONTRACTS[name]

    def perturbed(*args):
        out = _as_tuple(c.reference(*args))
        first = out[0]
        if wrong == "output":
            first = first + 1e-6
        else:  # zero in value, 1e-6 * the gradient in autograd
            first = first + 1e-6 * (first - first.detach())
        return (first, *out[1:]) if len(out) > 1 else first

    with pytest.raises(AssertionError, match=f"^{wrong}"):
        _check_against(c, function_for(name, forward_ad=False), perturbed)

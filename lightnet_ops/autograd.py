"""autograd.Functions for the fused ops, for the Python backends (triton, reference), built from the
op contracts (lightnet_ops/ops/<op>.py; what differs per op is the contract's ``AutogradSpec``).

Forward calls the backend's forward op; first-order backward calls its hand-written backward op
(never autograd through stock ops). Under ``create_graph=True`` backward switches to the contract's
reference backward, made of differentiable stock ops routed by the same saved tensors (argmax, ReLU
gate), so second derivatives are exact; ``jvp`` routes tangents the same way (forward-mode AD). The
Functions use the ``setup_context`` form with ``generate_vmap_rule``, so ``torch.func.grad`` / ``vjp``
/ ``jacrev`` / ``jvp`` / ``vmap`` work through them.

The extension's backends (cpu, cuda) record the same contract in C++ (csrc/<op>.cpp, through
autograd_op.h), which skips Python in backward; these classes still accept them. The backend is
passed as an already-resolved name (see registry.resolve). ``function_for(op, forward_ad)`` is the
Function to record; the public classes (``lightnet_ops.Conv2dReLUMaxPool2dFunction``, ...) are the
ones with the jvp rule."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch
import torch.autograd.forward_ad as forward_ad

from . import backend_registry as registry
from .ops import CONTRACTS, OpContract


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (torch.autograd.forward_ad.dual_level, torch.func.jvp)."""
    return forward_ad._current_level >= 0


def _creates_graph(*backward_inputs: Optional[torch.Tensor]) -> bool:
    """Backward under create_graph=True whose results depend on something that requires grad: it
    must record its own graph for a second derivative."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in backward_inputs)


def _masked(grads, mask) -> tuple:
    return tuple(g if need else None for g, need in zip(grads, mask))


def _apply_signature(contract: OpContract) -> inspect.Signature:
    """apply's signature: the forward schema's arguments, `backend` in place of the fixed ones (the
    schema's defaults kept, lists as tuples), so Function.apply binds keywords and defaults."""
    spec = contract.autograd
    args = torch._C.parse_schema(f"lightnet_ops::{contract.name}{contract.schema}").arguments
    params = []
    for a in args[:spec.backend_at] + args[spec.backend_at + len(spec.forward_fixed):]:
        default = inspect.Parameter.empty
        if a.has_default_value():
            default = tuple(a.default_value) if isinstance(a.default_value, list) else a.default_value
        params.append(inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    params.insert(spec.backend_at, inspect.Parameter("backend", inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return inspect.Signature(params)


def _with_signature(name: str, signature: inspect.Signature, run: Callable[[tuple], Any]) -> Callable[..., Any]:
    """``forward(<signature>)`` returning ``run(<its arguments as a tuple>)``, generated with real
    parameters as dataclasses generate ``__init__``: TorchDynamo binds apply's keywords by the
    forward's code (``co_varnames``), not by a ``__signature__``."""
    defaults = {f"_default_{n}": p.default for n, p in signature.parameters.items() if p.default is not p.empty}
    params = ", ".join(f"{n}=_default_{n}" if f"_default_{n}" in defaults else n for n in signature.parameters)
    source = (f"def _make({', '.join(['_run', *defaults])}):\n"
              f"    def forward({params}):\n"
              f"        return _run(({', '.join(signature.parameters)},))\n"
              f"    return forward\n")
    scope: dict[str, Any] = {}
    # The parameter names are the schema's, which torch has parsed: identifiers, nothing else.
    exec(compile(source, f"<{name}.forward>", "exec"), {}, scope)
    forward = scope["_make"](run, *defaults.values())
    forward.__module__, forward.__qualname__ = __name__, f"{name}.forward"
    return forward


def _check_backward_layout(contract: OpContract, n_grads: int) -> None:
    """The backward schema takes (grad_output, *saved, *params with output_mask where apply has backend),
    the order the Function calls it in; a contract that reads otherwise fails at import, not in backward."""
    spec = contract.autograd
    fwd = [a.name for a in torch._C.parse_schema(f"lightnet_ops::{contract.name}{contract.schema}").arguments]
    bwd = [a.name for a in torch._C.parse_schema(f"lightnet_ops::b{contract.backward_schema}").arguments]
    n_saved = len(spec.saved_inputs) + len(spec.saved_outputs)
    want = fwd[n_grads:spec.backend_at] + ["output_mask"] + fwd[spec.backend_at + len(spec.forward_fixed):]
    if bwd[1 + n_saved:] != want:
        raise TypeError(f"lightnet_ops.ops.{contract.name}: the backward schema's arguments after grad_output and "
                        f"the {n_saved} saved tensors are {bwd[1 + n_saved:]}, expected {want} (see AutogradSpec)")


def make_function(contract: OpContract) -> type[torch.autograd.Function]:
    """The op's autograd.Function (setup_context form, with jvp), named ``contract.autograd.function_name``."""
    spec = contract.autograd
    op = contract.name
    reference_backward, reference_jvp = contract.reference_backward, contract.reference_jvp
    n_grads = len(torch._C.parse_schema(f"lightnet_ops::b{contract.backward_schema}").returns)
    n_outputs = len(torch._C.parse_schema(f"lightnet_ops::{op}{contract.schema}").returns)
    _check_backward_layout(contract, n_grads)
    signature = _apply_signature(contract)
    n_args = len(signature.parameters)
    at, fixed, saved_inputs, saved_outputs = spec.backend_at, spec.forward_fixed, spec.saved_inputs, spec.saved_outputs
    head = at - n_grads  # params before backend: the backward op takes output_mask after them

    def run(args: tuple) -> Any:
        return registry.get(args[at]).kernels(op).forward(*args[:at], *fixed, *args[at + 1:])

    forward = _with_signature(spec.function_name, signature, run)

    def setup_context(ctx, inputs, output) -> None:
        outputs = output if n_outputs > 1 else (output,)
        if n_outputs > 1:
            ctx.mark_non_differentiable(*outputs[1:])
        saved = [inputs[i] for i in saved_inputs] + [outputs[i] for i in saved_outputs]
        ctx.save_for_backward(*saved)
        if forward_ad_active():
            ctx.save_for_forward(*saved)
        # Under TorchDynamo `inputs` holds only the arguments passed: the ops' defaults fill the rest.
        ctx.params = tuple(inputs[n_grads:at]) + tuple(inputs[at + 1:])
        ctx.backend = inputs[at]
        # An output that receives no gradient arrives as None (as in stock PyTorch's nodes) instead
        # of a zero tensor to route through the whole backward.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_output: Optional[torch.Tensor], *_grad_non_differentiable: Any) -> tuple:
        if grad_output is None:
            return (None,) * n_args
        saved = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:n_grads])
        params = ctx.params
        if _creates_graph(grad_output, *saved[:len(saved_inputs)]):
            # create_graph=True: the reference backward is made of differentiable stock ops routed by
            # the same saved tensors, so autograd records it and second derivatives are exact.
            grads = reference_backward(grad_output, *saved, *params[:head], mask, *params[head:])
        else:
            with torch.no_grad():
                grads = registry.get(ctx.backend).kernels(op).backward(
                    grad_output, *saved, *params[:head], mask, *params[head:])
        return _masked(grads, mask) + (None,) * (n_args - n_grads)

    def jvp(ctx, *tangents: Optional[torch.Tensor]) -> Any:
        """Forward-mode AD: the contract's tangent rule, routed by the saved tensors."""
        t_out = reference_jvp(*ctx.saved_tensors, *tangents[:n_grads], *ctx.params)
        return (t_out,) + (None,) * (n_outputs - 1) if n_outputs > 1 else t_out

    doc = (f"autograd.Function of the fused op ``{op}`` (hand-written backward, exact double backward and "
           f"forward-mode AD).\n\n``apply{signature}``: the forward op's arguments with ``backend``, a "
           "resolved backend name, in place of the ones the Function fixes.")
    return type(spec.function_name, (torch.autograd.Function,), {
        "__doc__": doc, "__module__": __name__, "__qualname__": spec.function_name,
        # vmap (e.g. per-sample gradients, vmap(grad(f))) runs forward/backward/jvp on batched tensors.
        "generate_vmap_rule": True,
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "jvp": staticmethod(jvp),
    })


def _reverse_only(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """TorchDynamo refuses to trace autograd.Functions that define a custom jvp. Outside forward-mode AD
    the functional API records this twin instead: the same Function with Function's default jvp, under
    the same class name (so graph nodes read "Conv2dReLUMaxPool2dFunctionBackward" either way)."""
    return type(function.__name__, (function,), {"jvp": torch.autograd.Function.jvp, "__module__": __name__,
                                                 "__qualname__": function.__qualname__})


def _build() -> dict[str, tuple[type[torch.autograd.Function], type[torch.autograd.Function]]]:
    functions = {}
    for name, contract in CONTRACTS.items():
        function = make_function(contract)
        functions[name] = (_reverse_only(function), function)
    return functions


#: op name -> (its Function without jvp, its Function with jvp), for every contract.
FUNCTIONS = _build()
_BY_CLASS_NAME = {pair[1].__name__: pair[1] for pair in FUNCTIONS.values()}


def function_for(op: str, forward_ad: bool) -> type[torch.autograd.Function]:
    """The Function to record for `op`: with the jvp rule when forward-mode AD (or a torch.func transform)
    is active, else its twin that TorchDynamo can trace."""
    return FUNCTIONS[op][forward_ad]


def __getattr__(name: str) -> type[torch.autograd.Function]:
    # The public Functions by class name (lightnet_ops.autograd.LinearReLUFunction), which is also
    # where pickle looks them up (their __module__ is this module).
    try:
        return _BY_CLASS_NAME[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None

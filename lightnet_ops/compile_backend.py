"""``torch.compile(model, backend="lightnet_ops")``: a TorchDynamo backend that rewrites
Conv2d->ReLU->MaxPool2d and Linear->ReLU chains in the captured FX graph to the fused ops.

Dynamo captures whatever it can (including forwards that ``torch.fx.symbolic_trace`` rejects,
such as the seed LightNet's ``num_flat_features`` loop over ``x.size()``); each captured graph is
rewritten with :func:`lightnet_ops.fuse.fuse_graph`, which matches the chains of the pattern table
``lightnet_ops.fuse.PATTERNS`` (the same table and rules as ``lo.fuse``: a chain is fused only when
every intermediate value has a single consumer) and replaces each by the call of its
``lightnet_ops.functional`` op, whose autograd.Functions carry the hand-written backward passes.
Modules are inlined in the captured graph, parametrizations and hooks included, so a parametrized or
pruned conv's computed weight simply becomes the fused op's weight argument, and a hook that
changes a value sits between two ops and keeps that chain stock. If the rewrite fails, the graph is
left as Dynamo captured it and the error propagates.

A BatchNorm2d is captured as ``F.batch_norm(..., training, ...)`` with the mode as a constant (Dynamo
guards on it and recaptures after ``.train()`` / ``.eval()``): in an eval-mode capture,
Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d becomes one call of
``lightnet_ops.fuse.conv2d_bn_relu_maxpool2d``, which folds the BatchNorm into the conv's weight and
bias on each call (differentiably); a training-mode capture keeps the chain stock.

By default the rewritten graph runs eagerly (op by op, like the "eager" backend). Options::

    torch.compile(model, backend="lightnet_ops",
                  options={"backend": "cpu",       # lightnet_ops backend of the fused ops (default "auto")
                           "inductor": True,       # hand the rewritten graph on to Inductor (default False)
                           "verbose": True})       # print what each captured graph fused

With ``inductor=True`` the graph goes through AOTAutograd + Inductor: the fused ops stay calls to
``torch.ops.lightnet_ops.*`` (forward and backward ops), Inductor compiles everything around them.

TorchDynamo finds the backend by the name "lightnet_ops" through the ``torch_dynamo_backends``
entry point that setup.py declares (an installed lightnet_ops has it; ``make build`` writes
lightnet_ops.egg-info for a checkout), so ``import lightnet_ops`` registers nothing and stays cheap.
Where lightnet_ops is imported without its metadata (a source tree on PYTHONPATH), call
:func:`register` once.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.fx as fx

from .fuse import FusedChain, fuse_graph

__all__ = ["BACKEND_NAME", "CompileReport", "lightnet_ops_backend", "register", "reports"]

BACKEND_NAME = "lightnet_ops"
_KNOWN_OPTIONS = ("backend", "inductor", "verbose")


@dataclass(frozen=True)
class CompileReport:
    """What the backend did to one captured graph."""

    fused: tuple[FusedChain, ...]
    skipped: tuple[FusedChain, ...]
    code: str            # Python code of the rewritten graph
    inductor: bool


#: The most recent reports, newest last (one per graph Dynamo handed to the backend).
reports: collections.deque[CompileReport] = collections.deque(maxlen=64)


def lightnet_ops_backend(gm: fx.GraphModule, example_inputs: list[Any], *,
                         options: Optional[dict[str, Any]] = None) -> Callable:
    """TorchDynamo backend: fuse the chains in `gm`, then run it eagerly or compile it with Inductor.

    Args:
        gm: the graph TorchDynamo captured (parameters are usually graph inputs).
        example_inputs: example (fake) inputs, used only by Inductor.
        options: {"backend": str, "inductor": bool, "verbose": bool}; see the module docstring.

    Returns:
        The callable Dynamo runs in place of the captured code.
    """
    opts = dict(options or {})
    unknown = set(opts) - set(_KNOWN_OPTIONS)
    if unknown:
        raise ValueError(f"lightnet_ops backend: unknown options {sorted(unknown)}; known: {list(_KNOWN_OPTIONS)}")
    backend = opts.get("backend", "auto")
    use_inductor = bool(opts.get("inductor", False))
    fused, skipped = fuse_graph(gm, backend=backend, use_modules=False)
    report = CompileReport(tuple(fused), tuple(skipped), gm.code, use_inductor)
    reports.append(report)
    if opts.get("verbose", False):
        lines = [f"lightnet_ops backend: {len(fused)} chain(s) fused in a graph of {len(gm.graph.nodes)} nodes"]
        lines += [f"  fused   {c}" for c in fused] + [f"  skipped {c}" for c in skipped]
        print("\n".join(lines))
    if use_inductor:
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    return gm.forward


def register() -> None:
    """Register the backend with TorchDynamo as "lightnet_ops" (idempotent; imports TorchDynamo).

    Only needed where the ``torch_dynamo_backends`` entry point is not visible (lightnet_ops imported
    from a source tree without lightnet_ops.egg-info); elsewhere TorchDynamo loads the backend itself.
    """
    from torch._dynamo import list_backends, register_backend

    if BACKEND_NAME not in list_backends(exclude_tags=()):  # includes entry points not loaded yet
        register_backend(compiler_fn=lightnet_ops_backend, name=BACKEND_NAME)
